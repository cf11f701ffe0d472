"""The local fine-tuning job: LoRA/QLoRA SFT of a chat model, OpenWeights-compatible (see README.md)."""

import time

PROCESS_START = time.monotonic()  # time to first step is measured from here (the job's own start)
