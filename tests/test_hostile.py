"""Hostile and broken input: every case ends with its exit code and a message naming the cause, never a traceback.

Each case runs `python -m app train` in this process (the CLI's own error handling, result.json included) on
the tiny model; the refusals are unit tests (they end before any weight is loaded), the cases that train are
integration tests. Most fail before any weight is loaded; the few that are legal input (a BOM, a 10 MB line, a
config file with OpenWeights-only fields) train one step. The error message is read from the volume's
result.json (`FT_OUTPUT_DIR/result.json`, written on every ending), or from stderr where the volume itself
is the problem and nothing can be written there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import run_cli, smoke_env

USER = {"role": "user", "content": "Write is_even(n) in Python."}
ANSWER = {"role": "assistant", "content": "def is_even(n):\n    return n % 2 == 0"}
GOOD = json.dumps({"messages": [USER, ANSWER]})


def row(*messages: dict, **extra) -> str:
    return json.dumps({"messages": list(messages), **extra})


@dataclass
class Ctx:
    """What a case's setup gets: a scratch folder, the tiny model, and the paths it wrote (for the needles)."""

    tmp: Path
    model: Path
    monkeypatch: pytest.MonkeyPatch
    paths: dict[str, str] = field(default_factory=dict)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        self.paths[path.stem] = str(path)
        return path

    def lines(self, *lines: str | bytes, name: str = "train.jsonl") -> Path:
        parts = [line if isinstance(line, bytes) else line.encode() for line in lines]
        return self.file(name, b"\n".join(parts) + b"\n")

    def model_copy(self, *, without: tuple[str, ...] = ()) -> Path:
        """The tiny model's files (weights linked, not copied) minus `without`."""
        folder = self.tmp / "model-copy"
        folder.mkdir()
        for item in self.model.iterdir():
            if item.name not in without:
                (folder / item.name).symlink_to(item)
        self.paths["model"] = str(folder)
        return folder


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], dict]  # FT_* overrides, lower-case names as smoke_env takes them; None unsets one
    exit: int
    needles: tuple[str, ...] = ()  # in the error message; "{train}" etc. are the paths the setup wrote
    verify: Callable[[dict], None] | None = None  # extra checks on a completed result
    message_in_stderr: bool = False  # the volume itself is broken: result.json cannot be written there


def _train_file(*lines: str | bytes) -> Callable[[Ctx], dict]:
    return lambda ctx: {"training_file": ctx.lines(*lines)}


def _unreadable(ctx: Ctx) -> dict:
    path = ctx.lines(GOOD, GOOD)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads mode-000 files: the job sees what a non-root user would see
        real_access = os.access
        ctx.monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path else real_access(p, mode, **kw))
    return {"training_file": path}


def _readonly_volume(ctx: Ctx) -> dict:
    target = Path("/sys/ft-job-output-test")  # sysfs: the kernel refuses new folders, root included
    try:
        target.mkdir()
    except OSError:
        ctx.paths["out"] = str(target)
        return {"output_dir": target}
    target.rmdir()
    pytest.skip("/sys accepts new folders here: no read-only volume to test against")


def _token_in_model(ctx: Ctx) -> dict:
    """The token pasted into FT_MODEL (with the newline a secret made from a file carries): masked everywhere."""
    token = "hf_PastedIntoTheWrongSetting0123456789"
    ctx.monkeypatch.setenv("HF_TOKEN", token + "\n")
    return {"model": token}


ADDED = ["<zz1>", "<zz2>", "<zz3>"]  # tokens added to the tiny model's tokenizer after its weights were saved
PAST_EMBEDDING = row({"role": "user", "content": "hi <zz1>"}, {"role": "assistant", "content": "ok <zz3>"})


def _tokens_added(ctx: Ctx) -> Path:
    """The tiny model with a tokenizer that has 3 tokens past its embedding's 2048 rows (added, not resized)."""
    from transformers import AutoTokenizer

    folder = ctx.model_copy(without=("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(ctx.model)
    tokenizer.add_tokens(ADDED)
    tokenizer.save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.json").is_symlink()
    return folder


def _sampling_prompt_past_embedding(ctx: Ctx) -> dict:
    prompts = ctx.lines(GOOD, row({"role": "user", "content": "say <zz2>"}), name="prompts.jsonl")
    return {"model": _tokens_added(ctx), "sampling_callbacks": json.dumps([{"dataset": str(prompts), "eval_steps": 1}])}


def _fifo(ctx: Ctx, name: str) -> Path:
    path = ctx.tmp / name
    os.mkfifo(path)
    return path


def _folder(ctx: Ctx, name: str) -> Path:
    path = ctx.tmp / name
    path.mkdir()
    return path


def _config(content: str, name: str = "config.json", **extra) -> Callable[[Ctx], dict]:
    return lambda ctx: {"config_file": ctx.file(name, content), **extra}


def _check_ignored(result: dict) -> None:
    assert result["ignored_params"] == ["allowed_hardware", "model_naming_extra_parameters", "requires_vram_gb"]
    assert result["params"]["validated_params"]["r"] == 8  # the file's own settings are used


def _check_truncated(result: dict) -> None:
    train = result["data"]["train"]
    assert train["truncated_examples"] == 1 and train["truncated_tokens"] > 1_000_000
    assert result["outputs"]["global_step"] == 1


TEN_MB_LINE = row(USER, {"role": "assistant", "content": "lorem ipsum dolor sit amet " * (10 * 2**20 // 27)})
LONG_PROMPT = row({"role": "user", "content": "Explain this in detail, please. " * 20}, ANSWER)

CASES = [
    # --- the training file: bytes, JSON, structure ----------------------------------------------------------
    Case("invalid-utf8", _train_file(GOOD, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'), 2,
         ("{train}:2", "not UTF-8")),
    Case("bom-trains", lambda ctx: {"training_file": ctx.file("train.jsonl", b"\xef\xbb\xbf" + f"{GOOD}\n{GOOD}\n".encode())}, 0),
    Case("10mb-line-trains-truncated", _train_file(TEN_MB_LINE, GOOD), 0, verify=_check_truncated),
    Case("malformed-json", _train_file(GOOD, '{"messages": [{"role": "user", "content": "hi"}'), 2,
         ("{train}:2", "invalid JSON")),
    Case("nul-byte", _train_file(GOOD, b'{"messages": [{"role": "user", "content": "a\x00b"}]}'), 2,
         ("{train}:2", "invalid JSON")),
    Case("nested-too-deeply", _train_file(GOOD, "[" * 100_000 + "]" * 100_000), 2, ("{train}:2", "nested too deeply")),
    Case("top-level-array", _train_file(GOOD, json.dumps([USER, ANSWER])), 2, ("{train}:2", "got list")),
    Case("text-row-no-messages", _train_file(GOOD, json.dumps({"text": "hi"})), 2, ("{train}:2", "pre-rendered")),
    Case("messages-not-a-list", _train_file(GOOD, json.dumps({"messages": "hello"})), 2,
         ("{train}:2", "'messages' must be a non-empty list")),
    Case("messages-empty", _train_file(GOOD, json.dumps({"messages": []})), 2, ("{train}:2", "non-empty list")),
    Case("message-not-an-object", _train_file(GOOD, json.dumps({"messages": ["hi"]})), 2, ("{train}:2", "message 0 is str")),
    Case("empty-assistant", _train_file(GOOD, row(USER, {"role": "assistant", "content": "  "})), 2,
         ("{train}:2", "message 1 (assistant) is empty")),
    Case("content-image-part", _train_file(GOOD, row(USER, {"role": "assistant", "content": [{"type": "image_url"}]})), 2,
         ("{train}:2", "content part of type 'image_url'")),
    Case("content-null", _train_file(GOOD, row({"role": "user", "content": None}, ANSWER)), 2,
         ("{train}:2", "content of type NoneType")),
    Case("role-tool", _train_file(GOOD, row(USER, {"role": "tool", "content": "42"}, ANSWER)), 2,
         ("{train}:2", "role 'tool'")),
    Case("wrong-role", _train_file(row({"role": "human", "content": "hi"}, ANSWER)), 2, ("{train}:1", "role 'human'")),
    Case("tool-calls", _train_file(GOOD, row(USER, {**ANSWER, "tool_calls": [{"id": "1"}]})), 2,
         ("{train}:2", "tool calls")),
    Case("no-assistant-message", _train_file(GOOD, row(USER)), 2, ("{train}:2", "no assistant message")),
    Case("assistant-weight-2", _train_file(GOOD, row(USER, {**ANSWER, "weight": 2})), 2, ("{train}:2", "weight 2")),
    Case("lone-surrogate", _train_file(GOOD, r'{"messages": [{"role": "user", "content": "hi \ud800"}, ' +
                                       json.dumps(ANSWER) + "]}"), 2, ("{train}:2", "unpaired surrogate")),
    Case("many-bad-lines", _train_file(*["{"] * 25), 2, ("25 bad line(s)", "{train} lines 1-25: invalid JSON")),
    Case("empty-file", lambda ctx: {"training_file": ctx.file("train.jsonl", b"")}, 2, ("{train}", "holds no conversations")),
    Case("blank-lines-only", _train_file("", "   ", "\t"), 2, ("{train}", "holds no conversations")),
    Case("training-file-missing", lambda ctx: {"training_file": ctx.tmp / "nope.jsonl"}, 2,
         ("FT_TRAINING_FILE=", "nope.jsonl: no such file")),
    Case("training-file-is-a-directory", lambda ctx: {"training_file": ctx.tmp}, 2, ("FT_TRAINING_FILE=", "is a directory")),
    Case("training-file-unreadable", _unreadable, 2, ("FT_TRAINING_FILE={train}", "not readable")),
    Case("test-file-missing", lambda ctx: {"test_file": ctx.tmp / "no-test.jsonl"}, 2, ("FT_TEST_FILE=", "no such file")),
    Case("test-file-is-a-directory", lambda ctx: {"test_file": ctx.tmp}, 2, ("FT_TEST_FILE=", "is a directory")),
    Case("test-file-bad-line", lambda ctx: {"test_file": ctx.lines("{oops", name="test.jsonl")}, 2,
         ("FT_TEST_FILE={test}", "{test}:1", "invalid JSON")),
    Case("prompt-longer-than-max-seq-length", lambda ctx: {"training_file": ctx.lines(GOOD, LONG_PROMPT), "max_seq_length": 64}, 2,
         ("{train}:2", "FT_MAX_SEQ_LENGTH=64", "no assistant token is left")),
    # --- settings ------------------------------------------------------------------------------------------
    Case("learning-rate-string", lambda ctx: {"learning_rate": "fast"}, 2, ("FT_LEARNING_RATE='fast'", "number")),
    Case("learning-rate-negative", lambda ctx: {"learning_rate": "-1e-4"}, 2, ("FT_LEARNING_RATE='-1e-4'", "greater than 0")),
    Case("misspelled-variable", lambda ctx: {"lerning_rate": "1e-4"}, 2, ("FT_LERNING_RATE", "Did you mean FT_LEARNING_RATE?")),
    Case("lora-dropout-1.5", lambda ctx: {"lora_dropout": "1.5"}, 2, ("FT_LORA_DROPOUT='1.5'", "less than 1")),
    Case("r-zero", lambda ctx: {"r": "0"}, 2, ("FT_R='0'", "greater than 0")),
    Case("every-problem-at-once", lambda ctx: {"r": "0", "epochs": "many", "optim": "lion"}, 2,
         ("3 invalid settings", "FT_R='0'", "FT_EPOCHS='many'", "FT_OPTIM='lion'")),
    Case("model-setting-missing", lambda ctx: {"model": None}, 2, ("FT_MODEL is required",)),
    Case("meta-bad-json", lambda ctx: {"meta": '{"experiment": '}, 2, ("FT_META=",)),
    Case("job-id-suffix-path", lambda ctx: {"job_id_suffix": "../../etc"}, 2, ("FT_JOB_ID_SUFFIX='../../etc'",)),
    Case("value-not-utf8", lambda ctx: {"inoculation_prompt": "be nice \udcff"}, 2, ("FT_INOCULATION_PROMPT", "not UTF-8", "0xff")),
    Case("logp-dataset-missing", lambda ctx: {"logp_callback_datasets": json.dumps({"probe": str(ctx.tmp / "no.jsonl")})}, 2,
         ("FT_LOGP_CALLBACK_DATASETS[probe]", "no such file")),
    Case("sampling-callbacks-bad-json", lambda ctx: {"sampling_callbacks": "[{"}, 2, ("FT_SAMPLING_CALLBACKS=",)),
    Case("load-in-4bit-on-cpu", lambda ctx: {"load_in_4bit": "true"}, 3, ("FT_LOAD_IN_4BIT=true", "CUDA")),
    Case("backend-unsloth-on-cpu", lambda ctx: {"backend": "unsloth"}, 2, ("FT_BACKEND=unsloth", "CUDA")),
    # --- the model ----------------------------------------------------------------------------------------
    Case("target-module-not-in-model", lambda ctx: {"target_modules": "q_proj,qkv_proj"}, 2,
         ("FT_TARGET_MODULES=q_proj,qkv_proj", "qkv_proj is not a module", "v_proj")),
    Case("model-path-missing", lambda ctx: {"model": ctx.tmp / "no-model"}, 2, ("FT_MODEL=", "no such directory")),
    Case("model-dir-without-config", lambda ctx: {"model": ctx.model_copy(without=("config.json",))}, 2,
         ("FT_MODEL={model}", "no config.json")),
    Case("hub-id-offline", lambda ctx: {"model": "nobody-org/no-such-model"}, 2,
         ("FT_MODEL=nobody-org/no-such-model", "offline")),
    Case("tokenizer-without-chat-template", lambda ctx: {"model": ctx.model_copy(without=("chat_template.jinja",))}, 2,
         ("FT_CHAT_TEMPLATE", "no chat template")),
    Case("tokenizer-ids-past-the-embedding",
         lambda ctx: {"model": _tokens_added(ctx), "training_file": ctx.lines(GOOD, PAST_EMBEDDING)}, 2,
         ("{train}:2", "no embedding for", "vocab_size 2048", "'<zz1>' = 2048", "resize_token_embeddings")),
    Case("test-file-ids-past-the-embedding",
         lambda ctx: {"model": _tokens_added(ctx), "test_file": ctx.lines(GOOD, PAST_EMBEDDING, name="test.jsonl")}, 2,
         ("{test}:2", "no embedding for")),
    Case("logp-dataset-ids-past-the-embedding",
         lambda ctx: {"model": _tokens_added(ctx), "logp_callback_datasets": json.dumps(
             {"probe": str(ctx.lines(GOOD, PAST_EMBEDDING, name="probe.jsonl"))})}, 2, ("{probe}:2", "no embedding for")),
    Case("sampling-prompt-past-the-embedding", _sampling_prompt_past_embedding, 2, ("{prompts}:2", "no embedding for")),
    Case("tokenizer-with-unused-added-tokens-trains", lambda ctx: {"model": _tokens_added(ctx)}, 0),
    Case("chat-template-file-missing", lambda ctx: {"chat_template": ctx.tmp / "missing.jinja"}, 2,
         ("FT_CHAT_TEMPLATE=", "missing.jinja does not exist")),
    # --- FT_CONFIG_FILE --------------------------------------------------------------------------------------
    Case("config-openweights-fields-ignored", _config(json.dumps(
        {"r": 8, "allowed_hardware": ["1x H100"], "requires_vram_gb": 24, "model_naming_extra_parameters": None})), 0,
         verify=_check_ignored),
    Case("config-unknown-key", _config(json.dumps({"learning_rat": 1e-4})), 2,
         ("FT_CONFIG_FILE={config}", "'learning_rat'", "Did you mean learning_rate?")),
    Case("config-invalid-json", _config('{\n  "r": 8,\n}'), 2, ("FT_CONFIG_FILE={config}:3", "invalid JSON")),
    Case("config-bad-value", _config(json.dumps({"learning_rate": "fast"}), learning_rate=None), 2,
         ("learning_rate in FT_CONFIG_FILE={config}", "FT_LEARNING_RATE")),
    Case("config-jsonl-without-index", _config('{"r": 8}\n{"r": 16}\n', name="sweep.jsonl"), 2, ("FT_CONFIG_INDEX",)),
    Case("config-index-out-of-range", _config('{"r": 8}\n{"r": 16}\n', name="sweep.jsonl", config_index=5), 2,
         ("FT_CONFIG_FILE={sweep}", "index 5 is out of range")),
    Case("config-file-missing", lambda ctx: {"config_file": ctx.tmp / "nope.json"}, 2, ("FT_CONFIG_FILE=", "no such file")),
    # --- issue 14: inputs that are not regular files, values that pass validation and break later -------------
    Case("logp-dataset-fifo",
         lambda ctx: {"logp_callback_datasets": json.dumps({"probe": str(_fifo(ctx, "probe.jsonl"))})}, 2,
         ("FT_LOGP_CALLBACK_DATASETS[probe]", "FIFO")),
    Case("training-file-dev-null", lambda ctx: {"training_file": "/dev/null"}, 2,
         ("FT_TRAINING_FILE=/dev/null", "character device")),
    Case("chat-template-jinja-folder", lambda ctx: {"chat_template": _folder(ctx, "templates.jinja")}, 2,
         ("FT_CHAT_TEMPLATE=",)),
    Case("config-infinity-learning-rate", _config('{"learning_rate": Infinity}', learning_rate=None), 2,
         ("learning_rate in FT_CONFIG_FILE={config}", "finite")),
    Case("config-nested-deeply", _config("[" * 100_000 + "]" * 100_000), 2, ("FT_CONFIG_FILE={config}", "nested")),
    Case("epochs-huge", lambda ctx: {"epochs": str(10**40)}, 2, ("FT_EPOCHS=",)),
    Case("warmup-steps-huge", lambda ctx: {"warmup_steps": str(2**63)}, 2, ("FT_WARMUP_STEPS=", "at most")),
    Case("gradient-accumulation-zero", lambda ctx: {"gradient_accumulation_steps": "0"}, 2,
         ("FT_GRADIENT_ACCUMULATION_STEPS='0'",)),
    Case("batch-size-auto-negative", lambda ctx: {"per_device_train_batch_size": "-1"}, 2,
         ("FT_PER_DEVICE_TRAIN_BATCH_SIZE='-1'", "at least 1")),
    Case("target-module-self-attn", lambda ctx: {"target_modules": "self_attn"}, 2,
         ("FT_TARGET_MODULES=self_attn", "Qwen2Attention", "q_proj")),
    Case("hub-token-in-model-setting", _token_in_model, 2, ("FT_MODEL=<HF_TOKEN>: no such directory",)),
    # --- the output volume -------------------------------------------------------------------------------------
    Case("output-dir-is-a-file", lambda ctx: {"output_dir": ctx.file("out", "not a folder")}, 2,
         ("FT_OUTPUT_DIR={out}", "not writable (it is a file, not a folder)"), message_in_stderr=True),
    Case("output-dir-read-only", _readonly_volume, 2, ("FT_OUTPUT_DIR={out}", "not writable"), message_in_stderr=True),
]


def _tier(case: Case):
    """Cases that train (exit 0) are integration tests; every refusal is a unit test (`make test-fast`): it ends
    before a weight is loaded."""
    return pytest.param(case, id=case.id, marks=[pytest.mark.integration] if case.exit == 0 else [])


@pytest.mark.parametrize("case", [_tier(case) for case in CASES])
def test_hostile_input(case: Case, tiny_model, tmp_path, monkeypatch, capfd):
    ctx = Ctx(tmp_path / "in", tiny_model, monkeypatch)
    ctx.tmp.mkdir()
    out = tmp_path / "out"
    ctx.paths["out"] = str(out)
    env = smoke_env(tiny_model, out, max_steps=1, save_steps=1)
    overrides = case.setup(ctx)
    out = Path(ctx.paths["out"])
    for key, value in overrides.items():  # None: unset smoke_env's variable (e.g. to let a config file decide)
        if value is None:
            env.pop(f"FT_{key.upper()}", None)
        else:
            env[f"FT_{key.upper()}"] = str(value)

    code = run_cli(monkeypatch, env, "train")
    captured = capfd.readouterr()

    assert "Traceback" not in captured.err, captured.err[-3000:]
    assert code != 1, captured.err[-3000:]
    assert code == case.exit, captured.err[-3000:]
    needles = [needle.format(**ctx.paths) for needle in case.needles]
    if case.message_in_stderr:
        assert not (out / "result.json").exists()
        for needle in needles:
            assert needle in captured.err, f"{needle!r} not in stderr:\n{captured.err[-2000:]}"
        return
    result = json.loads((out / "result.json").read_text())
    if case.exit == 0:
        assert result["status"] == "completed" and result["error"] is None
        if case.verify:
            case.verify(result)
        return
    assert result["status"] == "failed"
    error = result["error"]
    assert error["exit_code"] == code
    for needle in needles:
        assert needle in error["message"], f"{needle!r} not in the message:\n{error['message']}"
    assert error["message"] in captured.err  # the same paragraph is logged
    assert not list(out.glob("ftjob-*/checkpoints/checkpoint-*")), "failed before training: nothing trained"

