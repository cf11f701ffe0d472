"""python -m app [train|check|preview|sweep] -- the job's entry point.

    python -m app train                    # default: settings from FT_* (and FT_CONFIG_FILE)
    python -m app check                    # settings, data, GPU preflight; loads no weights
    python -m app preview -n 3 --json p.json   # the first rows as the trainer sees them
    python -m app sweep grid.jsonl         # every line a run (as FT_CONFIG_FILE), base model loaded once per GPU

Exit codes: 0 completed · 2 invalid settings or data · 3 not enough GPU · 4 training failed ·
75 interrupted after a checkpoint (run again to resume) · 1 unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path

from app.errors import EXIT_OK, Interrupted, JobError

log = logging.getLogger("app")


class RedactingFormatter(logging.Formatter):
    """Every log line, tracebacks included, without the values of *_TOKEN/*_KEY variables."""

    def format(self, record: logging.LogRecord) -> str:
        from app.result import redact

        return redact(super().format(record))


def configure_logging() -> None:
    from app.launch import is_main, launched, rank

    # Data-parallel ranks other than 0 log warnings and errors only, marked with their rank.
    prefix = f"[rank {rank()}] " if launched() else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(f"%(asctime)s %(levelname)-7s {prefix}%(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO if is_main() else logging.WARNING, handlers=[handler], force=True)
    # Library chatter: keep warnings, drop progress bars and info lines when stderr is a log file.
    from app.settings import set_library_defaults

    # The job shows its own progress (app/console.py): no bars for the libraries' dataset preparation; downloads
    # keep theirs on a terminal.
    set_library_defaults(TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    if not sys.stderr.isatty():
        set_library_defaults(HF_HUB_DISABLE_PROGRESS_BARS="1")
    for name in ("transformers", "datasets", "trl", "peft", "accelerate", "httpx", "huggingface_hub", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _reference() -> str:
    """--help's epilog: every setting with its default, the exit codes, the presets."""
    import textwrap

    from pydantic_core import PydanticUndefined

    from app import errors
    from app.settings import ENV_PREFIX, Settings

    lines = ["settings: environment variables (or an OpenWeights validated_params JSON in FT_CONFIG_FILE); each "
             "with its default. env/example.env lists them with the same words.", ""]
    for name, field in Settings.model_fields.items():
        env = "HF_TOKEN" if name == "hf_token" else ENV_PREFIX + name.upper()
        default = field.get_default(call_default_factory=True)
        shown = "(required)" if default is PydanticUndefined else "unset" if default in (None, [], {}) else (
            ",".join(default) if isinstance(default, list) else str(default).lower() if isinstance(default, bool)
            else str(default))
        lines += [f"  {env}={shown}", *textwrap.wrap(field.description, width=116, initial_indent="      ",
                                                      subsequent_indent="      ")]
    lines += ["", "exit codes:", f"  {errors.EXIT_OK} completed", f"  {errors.EXIT_INVALID} invalid settings or data "
              "(retrying won't help)", f"  {errors.EXIT_NO_GPU} not enough GPU (refused before loading weights)",
              f"  {errors.EXIT_TRAINING} training failed (non-finite loss, disk full)", f"  {errors.EXIT_INTERRUPTED} "
              "interrupted by SIGTERM/SIGINT after a checkpoint: run the same command again to resume",
              f"  {errors.EXIT_UNEXPECTED} unexpected (a bug: the traceback is in the log)"]
    presets = sorted((Path(__file__).resolve().parent.parent / "env").glob("*.env"))
    if presets:
        lines += ["", "presets (set -a; . env/NAME.env; set +a; python -m app train):"]
        for preset in presets:
            first = next((line.lstrip("# ").strip() for line in preset.read_text().splitlines() if line.startswith("#")), "")
            lines.append(f"  env/{preset.name:<12} {textwrap.shorten(first, 98)}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="LoRA/QLoRA fine-tuning job.",
                                     epilog=_reference(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("train", help="train (the default)")
    sub.add_parser("check", help="validate settings and data, run the GPU preflight; loads no weights")
    preview = sub.add_parser("preview", help="show the first training rows with the trained tokens marked")
    preview.add_argument("-n", type=int, default=3, help="rows to show (default 3)")
    preview.add_argument("--json", type=Path, help="write [{input_ids, labels}] to this file")
    sweep = sub.add_parser("sweep", help="train every line of a JSONL of settings, each base model loaded once "
                           "per GPU; summary in FT_OUTPUT_DIR/sweep.json")
    sweep.add_argument("file", type=Path, help="JSONL: one settings object per line (as FT_CONFIG_FILE takes it), "
                       "merged over the FT_* environment, which wins")
    sweep.add_argument("--workers", type=int, metavar="N", help="processes, each on its own GPU (default: one per "
                       "GPU, FT_NUM_GPUS or every visible one; 1 without a GPU)")
    sweep.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # a worker process of a sweep (app/sweep.py)
    sweep.add_argument("--device", help=argparse.SUPPRESS)  # the worker's GPU (CUDA_VISIBLE_DEVICES)
    return parser


TERMINATION_LOG = Path("/dev/termination-log")
TERMINATION_LOG_BYTES = 4096  # Kubernetes keeps this much of the termination message


def _termination_log(message: str) -> None:
    """Kubernetes shows /dev/termination-log as the container's termination message: redacted, cut to its 4,096
    bytes on a character boundary (JobError messages are bounded so that the reason fits: app/errors.py)."""
    from app.result import redact

    if TERMINATION_LOG.exists():
        data = redact(message).encode("utf-8")[:TERMINATION_LOG_BYTES].decode("utf-8", "ignore")
        try:
            TERMINATION_LOG.write_text(data, encoding="utf-8")
        except OSError:
            pass


class _RedactingStream:
    """stdout/stderr for the command's life: what libraries print (warnings, an HTTP error's repr) is redacted like
    the log."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        from app.result import redact

        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _ending(record, stop, err: BaseException) -> tuple[str, JobError]:
    """The status and error a failure is reported as. Once SIGTERM/SIGINT was received, any ending is an
    interruption (exit 75: run again), whatever a library made of the signal on its way up (an `except Exception`
    that wrapped it): never a permanent "invalid data" for Kubernetes' podFailurePolicy."""
    from app.errors import EXIT_UNEXPECTED, JobError

    if stop.requested and not isinstance(err, Interrupted):
        cause = err.message if isinstance(err, JobError) else f"{type(err).__name__}: {err}"
        return "interrupted", Interrupted(f"{stop.signal_name} received: stopped before completing ({cause[:500]}). "
                                          "Run the same command again: it resumes from the newest complete checkpoint, "
                                          "if there is one.")
    if isinstance(err, JobError):
        return ("interrupted" if isinstance(err, Interrupted) else "failed"), err
    unexpected = JobError(f"{type(err).__name__}: {err}")
    unexpected.kind, unexpected.exit_code = type(err).__name__, EXIT_UNEXPECTED
    return "failed", unexpected


def _report(command: str, record, stop, err: BaseException) -> int:
    """Log the failure as one paragraph, write result.json (status failed or interrupted) and the termination
    message; the exit code. Robust: it runs after anything went wrong."""
    from app.result import redact

    stop.ending = True  # a first SIGTERM now is recorded, not raised into the writing of the result
    status, error = _ending(record, stop, err)
    if isinstance(err, JobError) or error is not err and isinstance(error, Interrupted):
        log.error("%s", redact(error.message))
    else:  # a bug: keep the traceback (redacted by the log's formatter)
        log.error("unexpected error", exc_info=err)
    if command == "train":
        path = record.write(record.result(status, error))
        if path:
            log.error("result.json (status: %s, exit %d): %s", status, error.exit_code, path)
        _termination_log(f"{status} (exit {error.exit_code}): {error.message}")
    return error.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run one command. Libraries (unsloth's banners) print to stdout; they are sent to stderr so that stdout
    carries only the command's own output (check's JSON, preview's rows)."""
    stdout, stderr = sys.stdout, sys.stderr
    sys.stderr = _RedactingStream(stderr)  # no secret printed, whoever prints
    sys.stdout = sys.stderr
    try:
        return _main(argv, _RedactingStream(stdout))
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _main(argv: list[str] | None, stdout) -> int:
    with contextlib.redirect_stdout(stdout):  # --help is the command's output: `python -m app --help | less`
        args = _parser().parse_args(argv)
    command = args.command or "train"
    configure_logging()
    from app.result import Recorder
    from app.settings import load_settings
    from app.signals import StopRequest

    record = Recorder()
    stop = StopRequest()
    if command == "train":
        stop.install()
        stop.on_second_signal = lambda name: record.write(
            record.result("interrupted", Interrupted(f"{name} twice: exited without a checkpoint")))
    if command == "sweep":
        stop.install()  # each line's result.json on a second signal: app/sweep.py
    try:
        if command == "sweep":
            return _sweep(args, stop, stdout)
        record.settings, record.ignored = load_settings()
        if record.ignored:
            log.warning("OpenWeights fields not implemented here, ignored: %s", ", ".join(record.ignored))
        if command == "train" and (ranks := _ranks_wanted(record.settings)) > 1:
            from app.launch import launch

            return launch(ranks, ["train"])
        if command == "check":
            return _check(record, stdout)
        if command == "preview":
            return _preview(record, args.n, args.json, stdout)
        return _train(record, stop)
    except Exception as err:  # JobError: its exit code and one paragraph; anything else is a bug (traceback, exit 1)
        return _report(command, record, stop, err)


def _ranks_wanted(settings) -> int:
    """GPUs to train on (FT_NUM_GPUS, default all visible): more than one re-runs the job once per GPU."""
    from app.launch import launched

    if launched():
        return 1  # this process is a rank already
    from app.hardware import detect_hardware

    return detect_hardware(settings.num_gpus).num_gpus


def _train(record, stop) -> int:
    from app.launch import finish_ranks
    from app.pipeline import run

    result = run(record.settings, record, stop)
    finish_ranks()
    where = (record.job_root / "result.json") if record.job_root else record.settings.output_dir / "result.json"
    outputs = result.get("outputs", {})
    log.info("done: %s  train_loss %s  eval_loss %s", result["id"], outputs.get("train_loss"), outputs.get("eval_loss"))
    log.info("model: %s", result["params"]["validated_params"].get("finetuned_model_id"))
    log.info("result.json: %s", where)
    _termination_log(f"completed: {result['id']} -> {outputs.get('model_path')}")
    return EXIT_OK


def _sweep(args, stop, stdout) -> int:
    from app.sweep import main

    code = main(args.file, stop, stdout, workers=args.workers, worker=args.worker, device=args.device)
    if args.worker is None:
        _termination_log(f"sweep {args.file}: exit {code} (FT_OUTPUT_DIR/sweep.json has every line)")
    return code


def _check(record, stdout) -> int:
    from app.pipeline import check

    summary = check(record.settings, record)
    print(json.dumps(summary, indent=2, default=str), file=stdout)
    return EXIT_OK


def _preview(record, count: int, json_path: Path | None, stdout) -> int:
    from app.formatting import render_preview
    from app.pipeline import preview

    rows, tokenizer = preview(record.settings, record, count)
    mark = ("\x1b[42m", "\x1b[0m") if stdout.isatty() else ("[[", "]]")
    for index, row in enumerate(rows):
        trained = sum(label != -100 for label in row["labels"])
        print(f"--- row {index}: {len(row['input_ids'])} tokens, {trained} trained (marked {mark[0]}like this{mark[1]}) ---",
              file=stdout)
        print(render_preview(tokenizer, row, mark), file=stdout)
    if json_path:
        json_path.write_text(json.dumps(rows))
        log.info("wrote %d rows to %s", len(rows), json_path)
    return EXIT_OK
