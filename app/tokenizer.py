"""The tokenizer of FT_MODEL (and its chat template), as the masks and the trainer use it."""

from __future__ import annotations

from pathlib import Path

from app.errors import SettingsError


def load_tokenizer(settings, model_path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, token=settings.token())
    except (OSError, ValueError) as err:
        raise SettingsError([f"FT_MODEL={settings.model}: the tokenizer cannot be loaded from {model_path} ({err})."]) from None
    if settings.chat_template != "default":
        tokenizer.chat_template = settings.chat_template
    if not tokenizer.chat_template:
        raise SettingsError([f"FT_CHAT_TEMPLATE: the tokenizer of FT_MODEL={settings.model} has no chat template. "
                             "Set FT_CHAT_TEMPLATE to a Jinja template (or a .jinja file) for this model."])
    if settings.train_on_responses_only and not tokenizer.is_fast:
        raise SettingsError([f"FT_MODEL={settings.model}: its tokenizer is a slow (Python) tokenizer without "
                             "character offsets, which the assistant-only loss needs. Provide tokenizer.json, or "
                             "set FT_TRAIN_ON_RESPONSES_ONLY=false."])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
