"""SIGTERM/SIGINT: the first asks training to checkpoint and stop; a second exits at once.

Kept free of torch/transformers imports: the CLI installs it before unsloth (which must be imported first)
or anything heavy is loaded.
"""

from __future__ import annotations

import logging
import os
import signal

from app.errors import EXIT_INTERRUPTED, Interrupted

log = logging.getLogger(__name__)


class StopRequest:
    """Set by the first SIGTERM/SIGINT; read by the trainer at the end of each optimizer step."""

    def __init__(self):
        self.signal_name: str | None = None
        self.in_training = False
        self.ending = False  # the job is writing its failure: a signal then is recorded, never raised into that
        self.on_second_signal = None  # called before exiting on a second signal (writes result.json)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def handler(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.requested:
            log.error("%s again: exiting now without a checkpoint", name)
            if self.on_second_signal:
                try:
                    self.on_second_signal(name)
                finally:
                    os._exit(EXIT_INTERRUPTED)
            os._exit(EXIT_INTERRUPTED)
        self.signal_name = name
        if self.ending:
            log.warning("%s received while the job is ending: finishing its result.json", name)
            return
        if not self.in_training:  # outside the training loop there is nothing to checkpoint: stop where we are
            raise Interrupted(f"{name} received outside the training loop (while preparing, loading or saving): "
                              "stopped at once. Run the same command again: it resumes from the newest complete "
                              "checkpoint, if there is one.")
        log.warning("%s received: finishing this optimizer step, then saving a checkpoint (a second signal exits "
                    "at once)", name)

    def parent_gone(self, signum, frame):
        """A sweep worker's parent-death signal (SIGHUP, app.sweep.follow_parent): a first stop request, never a second
        (the kernel may send it again, as the orphaned worker is handed from one process to another)."""
        if not self.requested:
            log.warning("the sweep's process is gone: this worker checkpoints its line and exits")
            self.handler(signum, frame)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handler)
        signal.signal(signal.SIGINT, self.handler)
