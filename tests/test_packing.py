"""Packing changes the batch layout, not the loss: packed rows give the unpacked loss within 1e-4.

Both trainers are the job's own (setup + build_trainer), both compute the loss of one
batch that holds every example. The packed batch is padding-free with per-example position_ids; the test
also shows it would NOT match if examples could attend to each other (position_ids dropped).
"""

from __future__ import annotations

import pytest
import torch

from app.data import load_conversations
from app.formatting import Formatter, encode_all
from app.settings import load_settings
from tests.conftest import SAMPLE

pytestmark = pytest.mark.integration


def _trainer(tiny_model, tmp_path, packing: bool, n: int):
    """The job's own trainer (setup + build_trainer) on the first n examples, all in one micro-batch."""
    from app.pipeline import setup
    from app.signals import StopRequest
    from app.trainer import build_trainer

    first = tmp_path / "first.jsonl"
    first.write_text("".join((SAMPLE / "train.jsonl").read_text().splitlines(keepends=True)[:n]))
    settings, _ = load_settings(model=str(tiny_model), training_file=str(first), max_seq_length=4096,
                                output_dir=str(tmp_path / ("packed" if packing else "unpacked")), packing=packing,
                                per_device_train_batch_size=n, gradient_accumulation_steps=1)
    session = setup(settings)
    session.close()
    session.model.eval()
    examples = encode_all(Formatter(session.prepared.tokenizer, 4096), load_conversations(first))
    return build_trainer(session, StopRequest()).trainer, examples


def _one_batch_loss(trainer, drop_position_ids=False) -> tuple[float, dict]:
    batch = next(iter(trainer.get_train_dataloader()))
    if drop_position_ids:
        batch = {k: v for k, v in batch.items() if k != "position_ids"}
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    return float(loss), batch


def test_packed_loss_equals_unpacked_loss(tiny_model, tmp_path):
    n = 8
    unpacked, examples = _trainer(tiny_model, tmp_path, packing=False, n=n)
    packed, _ = _trainer(tiny_model, tmp_path, packing=True, n=n)
    # Same examples, same weights, one batch each.
    assert len(unpacked.train_dataset) == n
    assert sum(sum(r) for r in packed.train_dataset["seq_lengths"]) == sum(len(e.input_ids) for e in examples)
    loss_unpacked, batch_u = _one_batch_loss(unpacked)
    loss_packed, batch_p = _one_batch_loss(packed)
    assert batch_u["input_ids"].shape[0] == n and "attention_mask" in batch_u
    assert batch_p["input_ids"].shape[0] == 1 and "position_ids" in batch_p  # padding-free: one flat row
    assert (batch_u["labels"] != -100).sum() == (batch_p["labels"] != -100).sum()
    assert loss_packed == pytest.approx(loss_unpacked, rel=1e-4)

    # The check has teeth: with examples attending to each other (no per-example position_ids) the same
    # comparison fails, by far more than the packed/unpacked difference.
    loss_leaky, _ = _one_batch_loss(packed, drop_position_ids=True)
    leak = abs(loss_leaky - loss_unpacked) / loss_unpacked
    exact = abs(loss_packed - loss_unpacked) / loss_unpacked
    print(f"relative difference: packed {exact:.2e}, leaky {leak:.2e}")
    assert leak > 1e-4 and leak > 20 * exact
