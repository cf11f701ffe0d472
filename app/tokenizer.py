"""The model's tokenizer, loaded from its local folder the way the masks need it (fast, with offsets, exact).

`load_tokenizer(settings, model_path)` is app/pipeline.py's loader plus one workaround:

transformers 5.17 rebuilds some tokenizers from their class instead of using the folder's tokenizer.json:
- a folder whose tokenizer_config.json names `LlamaTokenizerFast` but whose tokenizer.json is a byte-level
  BPE (every DeepSeek-R1-Distill-Llama, for one) becomes a `LlamaTokenizer` with a SentencePiece-style
  Metaspace pre-tokenizer, which drops every space and newline ("Hello world" -> "Helloworld"): training on
  that text teaches the model garbage;
- a Phi-3 folder (`LlamaTokenizer`) loses the "▁" its tokenizer.json puts after every special token
  ("<|assistant|>\n" is "▁" + "\n" to the model, as it was trained): every prompt is tokenized unlike
  training and inference (vLLM reads tokenizer.json).
So when tokenizer.json exists, the loaded tokenizer must encode probe texts (plain, and around its special
tokens) to exactly the ids that tokenizer.json's own pipeline gives; when it does not, the tokenizer is
rebuilt from tokenizer.json itself (PreTrainedTokenizerFast, same config and special tokens). The result must
then round-trip the plain probe (decode(encode(text)) == text), or the job warns.
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.errors import SettingsError

log = logging.getLogger(__name__)

# Spaces, a double space, newlines, a tab, digits, punctuation and non-ASCII: what a lossy pipeline drops.
PROBE = "Hello world,  how are you?\n\nFine\tthanks: 1234 caf\u00e9 \u4f60\u597d.\n"


def tokenizer_of(model_path: Path, token: str | None = None):
    """The tokenizer of a model folder as the job uses it (bench/ loads its baselines' tokenizer so too)."""
    from transformers import AutoTokenizer

    return faithful_tokenizer(AutoTokenizer.from_pretrained(model_path, token=token), Path(model_path))


def load_tokenizer(settings, model_path: Path):
    """The tokenizer of `model_path` (a local folder), its chat template set or replaced by FT_CHAT_TEMPLATE."""
    try:
        tokenizer = tokenizer_of(model_path, settings.token())
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


def faithful_tokenizer(tokenizer, model_path: Path):
    """`tokenizer`, or one built from model_path/tokenizer.json when `tokenizer` encodes differently from it."""
    file = model_path / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(file))
        probes = [PROBE] + [f"{special}\nHello there{special} again" for special in tokenizer.all_special_tokens[:4]]
        reference = [backend.encode(probe, add_special_tokens=False).ids for probe in probes]
        if [_ids(tokenizer, probe) for probe in probes] != reference:
            from transformers import PreTrainedTokenizerFast

            log.warning(
                "The tokenizer transformers built for %s (%s) encodes text differently from its tokenizer.json "
                "(a known transformers 5 problem with local folders: e.g. a byte-level BPE rebuilt as a "
                "SentencePiece tokenizer loses its spaces). Using tokenizer.json as it is.",
                model_path, type(tokenizer).__name__,
            )
            tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
            if [_ids(tokenizer, probe) for probe in probes] != reference:  # tokenizer_config.json overrides some
                log.warning("The tokenizer rebuilt from %s/tokenizer.json still encodes differently from it (its "
                            "tokenizer_config.json changes special tokens); check the model folder.", model_path)
    if tokenizer.is_fast and _ids(tokenizer, PROBE) and tokenizer.decode(_ids(tokenizer, PROBE)) != PROBE:
        log.warning("The tokenizer of %s does not round-trip text (decode(encode(text)) != text): %r. Check that the "
                    "model folder holds the right tokenizer files.", model_path, tokenizer.decode(_ids(tokenizer, PROBE)))
    return tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def inference_stop_ids(model_path: Path, tokenizer) -> list[int]:
    """The token ids inference engines stop generating on for this model: generation_config.json's
    eos_token_id (an int or a list; else config.json's), then the tokenizer's eos (vLLM stops on both).
    Formatter(stop_ids=...) takes them: an answer is trained through the first of these, and followed by the
    tokenizer's eos when the template's end-of-turn is none of them (a base model's ChatML <|im_end|>)."""
    import json

    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = Path(model_path) / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        values = value if isinstance(value, list) else [value]
        ids = [int(v) for v in values if isinstance(v, int)]
        if ids:
            break
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
