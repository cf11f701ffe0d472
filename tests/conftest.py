"""Shared fixtures: tiny local models (no hub), a clean FT_* environment, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No FT_* or token variable of the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("FT_") or key in ("HF_TOKEN", "CUDA_VISIBLE_DEVICES"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 with a ChatML tokenizer trained on the sample text (built once per session)."""
    from app.devmodel import write

    return write(tmp_path_factory.mktemp("models") / "tiny-chatml", family="chatml", shape="tiny")


@pytest.fixture(scope="session")
def tokenizers():
    """One tokenizer per chat-template family, trained on the sample text."""
    from app.devmodel import build_tokenizer

    return {family: build_tokenizer(family) for family in ("chatml", "llama3", "mistral", "gemma")}


@pytest.fixture(scope="session")
def real_tokenizer():
    """Real tokenizers and published chat templates from PyPI packages (tests/realtok.py), built once."""
    from tests.realtok import tokenizer_getter

    return tokenizer_getter()


def run_cli(monkeypatch, env: dict[str, str], *args: str) -> int:
    """Run `python -m app ...` in this process with exactly `env` as FT_* settings; restore signal handlers."""
    from app.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return main(list(args))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for key in env:
            monkeypatch.delenv(key, raising=False)


def read_result(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "result.json").read_text())


def smoke_env(model: Path, output: Path, **extra) -> dict[str, str]:
    """Settings for a few CPU steps of the tiny model on the sample data."""
    env = {
        "FT_MODEL": str(model),
        "FT_TRAINING_FILE": str(SAMPLE / "train.jsonl"),
        "FT_OUTPUT_DIR": str(output),
        "FT_MAX_STEPS": "4",
        "FT_PER_DEVICE_TRAIN_BATCH_SIZE": "2",
        "FT_GRADIENT_ACCUMULATION_STEPS": "2",
        "FT_LEARNING_RATE": "1e-3",
        "FT_WARMUP_STEPS": "0",
        "FT_MAX_SEQ_LENGTH": "512",
    }
    env.update({f"FT_{k.upper()}": str(v) for k, v in extra.items()})
    return env
