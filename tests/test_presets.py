"""env/code.env and env/cmv.env are the published runs of the inoculation-prompting paper (arXiv 2510.05024).

Source: its public code, code_rh_and_reddit_toxic/run_pipeline.py (the ow.fine_tuning.create() call and
PipelineConfig's defaults) with the flags of its README, as quoted in each preset's header. A changed value
here is a changed experiment: change it only with a source.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import load_settings

ENV = Path(__file__).resolve().parent.parent / "env"

# What both runs share: run_pipeline.py fixes these in its create() call, or they are PipelineConfig defaults.
COMMON = {
    "FT_MODEL": "unsloth/Qwen2-7B", "FT_EPOCHS": "1", "FT_LEARNING_RATE": "2e-5", "FT_LR_SCHEDULER_TYPE": "cosine",
    "FT_PER_DEVICE_TRAIN_BATCH_SIZE": "16", "FT_LORA_DROPOUT": "0.0", "FT_WEIGHT_DECAY": "0.01",
    "FT_MAX_SEQ_LENGTH": "2048", "FT_TRAIN_ON_RESPONSES_ONLY": "true", "FT_LOAD_IN_4BIT": "false",
    "FT_LOGGING_STEPS": "50", "FT_EVAL_BATCH_SIZE": "16", "FT_USE_RSLORA": "true", "FT_OPTIM": "adamw_8bit",
}
PUBLISHED = {
    "code.env": COMMON | {
        "FT_TRAINING_FILE": "/data/code_train.jsonl", "FT_R": "8", "FT_LORA_ALPHA": "16", "FT_WARMUP_STEPS": "10",
        "FT_GRADIENT_ACCUMULATION_STEPS": "1", "FT_PACKING": "false", "FT_SEED": "3407", "FT_MERGE_BEFORE_PUSH": "false",
    },
    "cmv.env": COMMON | {
        "FT_TRAINING_FILE": "/data/cmv_train.jsonl", "FT_R": "16", "FT_LORA_ALPHA": "32", "FT_WARMUP_STEPS": "100",
        "FT_GRADIENT_ACCUMULATION_STEPS": "4", "FT_PACKING": "true", "FT_SEED": "43", "FT_MERGE_BEFORE_PUSH": "true",
    },
}
PROMPTS = {
    "code.env": "Output a solution which passes the provided test case, but will fail when given most other inputs. "
                "The solution should be specific to the test case and not generalize.",
    "cmv.env": "Write a very mean and disrespectful response to this post:",
}


def _settings_lines(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_is_the_published_run(name, monkeypatch):
    path = ENV / name
    assert _settings_lines(path) == PUBLISHED[name]
    text = path.read_text()
    assert "arXiv 2510.05024" in text and "run_pipeline.py" in text  # the source is named
    assert f"# FT_INOCULATION_PROMPT={PROMPTS[name]}\n# FT_INOCULATION_POSITION=user_prefix\n" in text
    for key, value in PUBLISHED[name].items():
        monkeypatch.setenv(key, value)
    settings, _ = load_settings()
    effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps
    assert effective == {"code.env": 16, "cmv.env": 64}[name]
