"""Local stand-in models: a tokenizer trained on bundled text, a chat template, random weights.

No weights exist on the development and CI machines and nothing may be fetched from a hub, so the smoke
run, the tests and the GPU benchmarks build their models here, deterministically, from a config:

    python -m app.devmodel --out .cache/models/tiny-chatml                   # the `make run` model
    python -m app.devmodel --out /tmp/qwen2-7b --shape qwen2-7b --device cuda  # architecture-faithful, random

Speed and memory depend on the shape, not on the weights, so the Qwen2 shapes below are what GPU tests and
benchmarks measure. The chat-template families cover the ones the masks are tested on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"

# Chat templates, as their model families ship them (trimmed of tool-calling branches).
TEMPLATES = {
    # Qwen2-Instruct (ChatML), with its default system prompt.
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama-3-Instruct.
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Mistral-7B-Instruct v0.1/v0.2 ([INST], no system role, strict alternation).
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # Gemma / Gemma-2 (no system role: the template raises on one).
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
        "{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    # Mistral-7B-Instruct v0.3 style: the system prompt goes into the LAST user turn, so earlier turns
    # render differently once later ones exist. Masks cannot be derived from it: the job must refuse it.
    "mistral-v3-system-last": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
        "{%- if loop.last and system_message is defined %}"
        "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
        "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}"
        "{%- endfor %}"
    ),
}

# family: (special tokens, bos, eos (the end-of-turn token), pad, byte-level BPE (True) or SentencePiece-like)
FAMILIES = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", True),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", True,
    ),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "<unk>", False),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>",
              "<pad>", False),
}
FAMILIES["mistral-v3-system-last"] = FAMILIES["mistral"]

# Qwen2's pre-tokenizer split (transformers' models/qwen2/tokenization_qwen2.py, and Qwen2's tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# Architecture-faithful shapes (Qwen2 family: published config.json values).
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=None),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, vocab_size=None),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
}


def sample_texts(sample_dir: Path = SAMPLE_DIR) -> list[str]:
    """Every message content of the bundled sample data: the tokenizer's training corpus."""
    texts = []
    for path in sorted(sample_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts += [m["content"] for m in json.loads(line)["messages"]]
    if not texts:
        raise FileNotFoundError(f"no sample conversations under {sample_dir}")
    return texts


def build_tokenizer(family: str = "chatml", vocab_size: int = 2048, texts: list[str] | None = None):
    """A fast tokenizer of one chat-template family, trained on the sample text (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, byte_level = FAMILIES[family]
    texts = texts if texts is not None else sample_texts()
    # Role names and template words, so they are single tokens as in real vocabularies.
    texts = texts + ["system user assistant model You are a helpful assistant."] * 20
    if byte_level:  # GPT-2/Qwen2/Llama-3 style
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece style (Llama-2/Mistral/Gemma): "▁" marks a word start, byte fallback
        tokenizer = Tokenizer(models.BPE(unk_token=specials[0] if family != "gemma" else "<unk>", byte_fallback=True))
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        alphabet = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet if byte_level else [],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if family == "chatml":
        # After training (the vocabulary stays as it was learned): Qwen2's own normalizer and pre-tokenizer, the
        # ones transformers builds for any folder whose config.json says qwen2. tokenizer.json and the loaded
        # tokenizer then encode alike, as they do for a real Qwen2 (app/tokenizer.py checks they do).
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if not byte_level:
        tokenizer.add_tokens(alphabet)  # byte-fallback pieces for unseen characters
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
        unk_token="<unk>" if not byte_level else None, additional_special_tokens=specials,
    )
    fast.chat_template = TEMPLATES[family]
    fast.model_max_length = 32768
    return fast


def build_model(shape: str = "tiny", vocab_size: int = 2048, seed: int = 0, device: str = "cpu", dtype=None):
    """A Qwen2 decoder of the given shape with random weights (initializer_range 0.02)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    spec = dict(SHAPES[shape])
    spec["vocab_size"] = spec["vocab_size"] or vocab_size
    config = Qwen2Config(
        **spec, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        use_sliding_window=False, bos_token_id=None, eos_token_id=None,
        dtype="bfloat16" if dtype == "bfloat16" else "float32",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if dtype else torch.float32)
    return model


def write(out: Path, family: str = "chatml", shape: str = "tiny", seed: int = 0, device: str = "cpu",
          dtype: str | None = None) -> Path:
    """Build and save tokenizer + model to `out` (skipped when `out` already holds one of this recipe)."""
    out = Path(out)
    recipe = {"family": family, "shape": shape, "seed": seed, "dtype": dtype, "tokenizer": 2}
    stamp = out / "devmodel.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return out
    tokenizer = build_tokenizer(family)
    model = build_model(shape, vocab_size=len(tokenizer), seed=seed, device=device, dtype=dtype)
    _, _, eos, pad, _ = FAMILIES[family]
    model.config.eos_token_id = tokenizer.convert_tokens_to_ids(eos)
    model.config.pad_token_id = tokenizer.convert_tokens_to_ids(pad)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stamp.write_text(json.dumps(recipe))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--family", default="chatml", choices=sorted(FAMILIES))
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda: fast for 7B)")
    parser.add_argument("--dtype", default=None, choices=[None, "bfloat16"], help="saved weight dtype")
    args = parser.parse_args(argv)
    path = write(args.out, args.family, args.shape, args.seed, args.device, args.dtype)
    print(path)


if __name__ == "__main__":
    main()
