"""The published code run through openweights 0.14.0's own training code: bench/e2e.py's `ow` path.

    python -m bench.ow_style --model DIR --data FILE --preset env/code.env --out DIR --ow-dir OWJOBS

OWJOBS is the wheel's openweights/jobs/unsloth folder (`pip download --no-deps openweights==0.14.0`, unzipped):
its training.py `train()` runs as OpenWeights' worker runs it (unsloth's FastLanguageModel, its SFT recipe in
sft.py: the rendered text plus the eos, unsloth's train_on_responses_only, TRL's SFTTrainer with its SFTConfig),
on a TrainingConfig (its validate.py) of the preset's settings. Only what needs OpenWeights' cloud is replaced:
its client (a recorder of what it would log), `backoff` (not installed on the GPU host) and the push to the hub
(the adapter is saved locally instead). Prints `BENCH_RESULT {json}` last.
"""

from __future__ import annotations

import time

START = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402


def _stub_modules(logged: list[dict]) -> None:
    """openweights.client (OpenWeights() and its run.log) and backoff, as the worker's modules import them."""
    client = types.ModuleType("openweights.client")

    class _Run:
        id = "bench"

        def log(self, payload, *args, **kwargs):
            logged.append(dict(payload))

    class OpenWeights:
        def __init__(self, *args, **kwargs):
            self.run = _Run()

    client.OpenWeights = OpenWeights
    package = types.ModuleType("openweights")
    package.client = client
    package.__path__ = []
    backoff = types.ModuleType("backoff")
    backoff.constant = lambda *a, **k: None
    backoff.on_exception = lambda *a, **k: (lambda function: function)
    sys.modules.update({"openweights": package, "openweights.client": client, "backoff": backoff})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--ow-dir", required=True, type=Path)
    args = parser.parse_args()

    from bench.e2e import read_env_file

    logged: list[dict] = []
    _stub_modules(logged)
    os.environ.setdefault("HF_TOKEN", "")
    sys.path.insert(0, str(args.ow_dir))
    import sft
    import torch
    import training
    import unsloth  # noqa: F401  (first, as OpenWeights' worker does)
    from transformers import TrainerCallback
    from validate import TrainingConfig

    first_step: list[float] = []
    captured: dict = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if not first_step:
                first_step.append(time.monotonic() - START)

    build = sft.sft_train

    def sft_train(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(FirstStep())
        run = trainer.train

        def train(*ta, **tk):
            captured["output"] = run(*ta, **tk)
            captured["tokens"] = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
            return captured["output"]

        trainer.train = train
        return trainer

    sft.sft_train = sft_train

    def push_model(cfg, model_id, model, tokenizer):  # OpenWeights pushes to the hub; here: the volume
        model.save_pretrained(args.out / "adapter")
        tokenizer.save_pretrained(args.out / "adapter")

    training.push_model = push_model
    preset = {k[3:].lower(): v for k, v in read_env_file(args.preset).items() if k.startswith("FT_")}
    params = {name: field.annotation for name, field in TrainingConfig.model_fields.items()}
    values = {k: v for k, v in preset.items() if k in params and k not in ("model", "training_file", "test_file")}
    if args.max_steps:
        values["max_steps"] = args.max_steps
    config = TrainingConfig(model=args.model, training_file=args.data, loss="sft", finetuned_model_id="local/bench",
                            output_dir=str(args.out / "checkpoints"), **values)
    training.train(config)
    output = captured["output"]
    runtime = output.metrics.get("train_runtime")
    print("BENCH_RESULT " + json.dumps({
        "status": "ok", "backend": "unsloth", "first_step_s": round(first_step[0], 2) if first_step else None,
        "train_s": runtime, "loss": output.training_loss, "global_step": output.global_step,
        "train_tokens": captured.get("tokens"),
        "tokens_per_second": round(captured["tokens"] / runtime, 1) if runtime and captured.get("tokens") else None,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "settings": {k: getattr(config, k) for k in sorted(values)},
    }, default=str), flush=True)


if __name__ == "__main__":
    main()
