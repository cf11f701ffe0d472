"""What the job does to reach its first step sooner (app/model_source.py prefetch_weights, app/pipeline.py)."""

from __future__ import annotations

import builtins

import app.model_source as model_source


def test_prefetch_reads_every_weight_file_once_in_the_background(tmp_path, monkeypatch):
    for name, size in (("model-00001-of-00002.safetensors", 3 * 2**20), ("model-00002-of-00002.safetensors", 5),
                       ("config.json", 10), ("tokenizer.json", 10)):
        (tmp_path / name).write_bytes(b"x" * size)
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: opened.append(path.name) or real_open(path, *a, **k))
    thread = model_source.prefetch_weights(tmp_path)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert opened == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_no_prefetch_when_the_weights_would_crowd_the_memory_or_there_are_none(tmp_path, monkeypatch):
    assert model_source.prefetch_weights(tmp_path) is None  # no weights (a hub id's metadata folder)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 4096)
    monkeypatch.setattr(model_source.os, "sysconf", lambda name: 1)  # one page of one byte available
    assert model_source.prefetch_weights(tmp_path) is None
