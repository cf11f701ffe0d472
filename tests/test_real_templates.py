"""Masks on real chat templates with real tokenizers (tests/realtok.py: PyPI packages only, cached in .cache/).

For every family and conversation kind the trained tokens must decode to exactly what the model writes at
inference for each answer, written out here per family (not derived by the code under test): the text that
follows `render(history, add_generation_prompt=True)` when the model answers, through the end-of-turn token
the inference engine stops on. Nothing of a system or user message is trained, and the system prompt is in
what the model is shown before every trained answer, or the job refuses with a remedy that works.

Vocabularies (see realtok.VOCABS for each): real for Qwen2/2.5/3, Llama 3.x, Phi-3/3.5, Gemma 4, Mistral v0.3,
Mistral Large 2411 (v7) and Mistral Nemo (tekken); related where the family's own files are on no PyPI
package: DeepSeek-R1 distills (Llama 3 / Qwen2 vocabularies with R1's special tokens at their real ids),
Gemma 2/3 (Gemma 4's vocabulary with Gemma 3's turn tokens at ids 105/106), Phi-4 (Qwen2's cl100k-based
vocabulary), Mistral Small 3.2 (the 2409 tekken). The templates are the published ones.
"""

from __future__ import annotations

import pytest

from app.data import Conversation
from app.errors import DataError, SettingsError
from app.formatting import IGNORE, Formatter, apply_inoculation, encode_all
from tests import realtok

SYSTEM = "You are a careful assistant. Answer briefly."
U1, A1 = "What is the capital of France?", "Paris is the capital of France."
U2, A2 = "And of Italy?", "Rome."
U3, A3 = "Thanks!", "You are welcome."
R1, R2 = "The user asks for a capital. France's is Paris.", "Italy: Rome."

KINDS = {
    "single": [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}],
    "multi": [{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
              {"role": "user", "content": U2}, {"role": "assistant", "content": A2},
              {"role": "user", "content": U3}, {"role": "assistant", "content": A3}],
    "system": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": U1},
               {"role": "assistant", "content": A1}],
    "system-multi": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": U1},
                     {"role": "assistant", "content": A1}, {"role": "user", "content": U2},
                     {"role": "assistant", "content": A2}],
    "reasoning": [{"role": "user", "content": U1}, {"role": "assistant", "content": f"<think>\n{R1}\n</think>\n\n{A1}"},
                  {"role": "user", "content": U2}, {"role": "assistant", "content": f"<think>\n{R2}\n</think>\n\n{A2}"}],
}


def split_reasoning(content: str) -> tuple[str | None, str]:
    if "</think>" not in content:
        return None, content
    head, answer = content.split("</think>", 1)
    return head.split("<think>", 1)[1].strip("\n"), answer.lstrip("\n")


def expected(name: str, content: str) -> str:
    """What the model writes after the generation prompt, for one answer, per family (decided by reading each
    template: see app/formatting.py for the decisions)."""
    reasoning, answer = split_reasoning(content)
    eos_r1 = "<｜end▁of▁sentence｜>"
    if name == "qwen3":  # the template renders the last answer with a think block; the prompt leaves it open
        return f"<think>\n{reasoning or ''}\n</think>\n\n{answer}<|im_end|>" if reasoning else \
            f"<think>\n\n</think>\n\n{answer}<|im_end|>"
    if name in ("r1-distill-llama", "r1-distill-qwen"):  # the prompt ends in "<think>\n": the model closes it
        return (f"{reasoning}\n</think>\n\n{answer}" if reasoning else f"\n</think>\n\n{answer}") + eos_r1
    if name == "r1-distill-qwen-llamacpp":  # the prompt closes the think block: reasoning cannot be written
        return (f"\n\n{answer}" if reasoning else answer) + eos_r1
    return {
        "qwen2.5": f"{content}<|im_end|>", "phi4": f"{content}<|im_end|>",
        "llama3.1": f"{content}<|eot_id|>", "llama3.2": f"{content}<|eot_id|>", "llama3.3": f"{content}<|eot_id|>",
        "gemma2": f"{content}<end_of_turn>", "gemma3": f"{content}<end_of_turn>", "gemma4": f"{content}<turn|>",
        "mistral-v0.3": f" {content}</s>", "mistral-v7-large": f" {content}</s>",
        "mistral-nemo": f"{content}</s>", "mistral-small-3.2": f"{content}</s>",
        "phi3-mini": f"{content}<|end|>", "phi3.5-mini": f"{content}<|end|>",
    }[name]


CASES = [(name, kind) for name, family in realtok.FAMILIES.items() for kind in KINDS
         if kind != "reasoning" or family.reasoning]


def load_folder(folder):
    from app.settings import load_settings
    from app.tokenizer import load_tokenizer

    settings, _ = load_settings(model=str(folder), training_file="unused.jsonl", output_dir="/tmp/unused")
    return load_tokenizer(settings, folder)


def rows_of(tokenizer, name, messages, **kwargs):
    formatter = Formatter(tokenizer, 8192, stop_ids=realtok.stop_ids(tokenizer, name), **kwargs)
    return encode_all(formatter, [Conversation(messages=messages, source="data.jsonl:7")]), formatter


def trained_texts(tokenizer, rows) -> list[tuple[str, str]]:
    """(context, trained text) of every run of trained tokens, in order, decoded independently of offsets:
    the text of the row through the run minus the text before it."""
    runs = []
    for row in rows:
        labels = row.labels
        start = None
        for position in range(len(labels) + 1):
            trained = position < len(labels) and labels[position] != IGNORE
            if trained and start is None:
                start = position
            elif not trained and start is not None:
                before = tokenizer.decode(row.input_ids[:start], skip_special_tokens=False)
                through = tokenizer.decode(row.input_ids[:position], skip_special_tokens=False)
                assert through.startswith(before)
                runs.append((before, through[len(before):]))
                start = None
    return runs


def answers(messages):
    return [m["content"] for m in messages if m["role"] == "assistant" and m.get("weight", 1) == 1]


@pytest.mark.parametrize("name,kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_trained_tokens_are_what_the_model_writes(real_tokenizer, name, kind):
    tokenizer = real_tokenizer(name)
    messages = KINDS[kind]
    if kind.startswith("system") and not realtok.FAMILIES[name].system:
        with pytest.raises(SettingsError) as err:
            rows_of(tokenizer, name, messages)
        assert "data.jsonl:7" in err.value.message and "FT_INOCULATION_POSITION=user_prefix" in err.value.message
        # The remedy it names works: the prompt moves into the first user turn and is kept.
        messages = apply_inoculation(messages[1:], SYSTEM, "user_prefix")
    rows, _ = rows_of(tokenizer, name, messages)
    runs = trained_texts(tokenizer, rows)
    assert [text for _, text in runs] == [expected(name, a) for a in answers(messages)]
    for context, text in runs:
        for message in messages:
            if message["role"] != "assistant":
                assert message["content"] not in text
        if any(m["role"] == "system" for m in KINDS[kind]):
            assert SYSTEM in context  # the system prompt is shown before every trained answer
    assert all(row.source == "data.jsonl:7" for row in rows)


@pytest.mark.parametrize("name", ["mistral-v0.3", "mistral-nemo"])
def test_system_prompt_kept_when_training_on_every_token(real_tokenizer, name):
    """The template attaches the system prompt to the last user turn only while that turn is last: the full
    render of a conversation ending with an answer has none. Every row must still show it."""
    tokenizer = real_tokenizer(name)
    rows, _ = rows_of(tokenizer, name, KINDS["system-multi"], train_on_responses_only=False)
    assert len(rows) == 2
    for row in rows:
        assert row.labels == row.input_ids
        assert SYSTEM in tokenizer.decode(row.input_ids, skip_special_tokens=False)


def test_dropped_system_prompt_refused_in_every_mode(real_tokenizer):
    tokenizer = real_tokenizer("phi3-mini")
    for responses_only in (True, False):
        with pytest.raises(SettingsError) as err:
            rows_of(tokenizer, "phi3-mini", KINDS["system"], train_on_responses_only=responses_only)
        message = err.value.message
        assert "data.jsonl:7" in message and "FT_INOCULATION_POSITION=user_prefix" in message
        assert "FT_CHAT_TEMPLATE" in message and "FT_TRAIN_ON_RESPONSES_ONLY" not in message
    # The other remedy it names works too: a template that renders the system message (Phi-3.5's, same vocabulary).
    tokenizer.chat_template = realtok.template_of(realtok.FAMILIES["phi3.5-mini"])
    rows, _ = rows_of(tokenizer, "phi3-mini", KINDS["system"])
    [(context, text)] = trained_texts(tokenizer, rows)
    assert SYSTEM in context and text == f"{A1}<|end|>"


def test_prefix_stable_templates_keep_one_row_per_conversation(real_tokenizer):
    for name in ("qwen2.5", "llama3.1", "gemma3", "phi4", "mistral-v7-large"):
        rows, formatter = rows_of(real_tokenizer(name), name, KINDS["system-multi"])
        assert len(rows) == 1 and formatter.stats.conversations == 1 and formatter.stats.examples == 1


def test_non_prefix_stable_templates_train_one_row_per_answer(real_tokenizer):
    rows, formatter = rows_of(real_tokenizer("qwen3"), "qwen3", KINDS["multi"])
    assert len(rows) == 3 and formatter.stats.conversations == 1 and formatter.stats.examples == 3
    assert formatter.stats.split_conversations == 1
    # Row i shows the history as inference renders it: earlier answers without their think blocks.
    tokenizer = real_tokenizer("qwen3")
    last = tokenizer.decode(rows[2].input_ids, skip_special_tokens=False)
    assert last.count("<think>") == 1 and f"{A1}<|im_end|>" in last


def test_phi35_trailing_eos_is_cut_at_the_stop_token(real_tokenizer):
    """Phi-3.5's template appends <|endoftext|> to every render without a generation prompt. Engines stop at
    <|end|> (its generation_config), so the model never writes it: it is not trained, and multi-turn works."""
    tokenizer = real_tokenizer("phi3.5-mini")
    rows, _ = rows_of(tokenizer, "phi3.5-mini", KINDS["multi"])
    assert len(rows) == 1
    assert [t for _, t in trained_texts(tokenizer, rows)] == [f"{a}<|end|>" for a in answers(KINDS["multi"])]
    # An engine that stops only on the tokenizer's eos: the model must write it, after <|end|>.
    formatter = Formatter(tokenizer, 8192, stop_ids=[tokenizer.convert_tokens_to_ids("<|endoftext|>")])
    rows = encode_all(formatter, [Conversation(messages=KINDS["multi"], source="data.jsonl:7")])
    # Phi-3's tokenizer.json prepends "▁" to the text after every special token: "\n" is written "▁" + "\n".
    texts = [t for _, t in trained_texts(tokenizer, rows)]
    assert texts == [f"{a}<|end|> \n<|endoftext|>" for a in answers(KINDS["multi"])]


def test_base_model_eos_is_appended_and_trained(real_tokenizer):
    """Qwen2-7B (base): tokenizer eos <|endoftext|>, generation_config eos <|endoftext|>, ChatML turns end in
    <|im_end|>. The model must write <|endoftext|> after its answer or it never stops (OpenWeights appends it)."""
    tokenizer = real_tokenizer("qwen2.5")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    formatter = Formatter(tokenizer, 8192, stop_ids=[endoftext])
    rows = encode_all(formatter, [Conversation(messages=KINDS["multi"], source="data.jsonl:7")])
    texts = [t for _, t in trained_texts(tokenizer, rows)]
    assert len(rows) == 1 and texts == [f"{A1}<|im_end|>", f"{A2}<|im_end|>", f"{A3}<|im_end|><|endoftext|>"]
    assert rows[0].input_ids[-1] == endoftext and formatter.stats.eos_appended == 1
    # An instruct model whose engine stops on <|im_end|>: nothing appended.
    rows, formatter = rows_of(tokenizer, "qwen2.5", KINDS["multi"])
    assert formatter.stats.eos_appended == 0 and rows[0].input_ids[-1] != endoftext


def test_reasoning_the_prompt_forbids_is_counted(real_tokenizer):
    rows, formatter = rows_of(real_tokenizer("r1-distill-qwen-llamacpp"), "r1-distill-qwen-llamacpp", KINDS["reasoning"])
    assert formatter.stats.reasoning_dropped == 2


def test_long_conversation_refused_with_its_line(real_tokenizer):
    from app.formatting import MAX_MESSAGES

    tokenizer = real_tokenizer("qwen2.5")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(MAX_MESSAGES + 2)]
    with pytest.raises(DataError) as err:
        rows_of(tokenizer, "qwen2.5", messages)
    assert "data.jsonl:7" in err.value.message and str(MAX_MESSAGES) in err.value.message


def test_real_vocabularies_match_llama_cpp_fixtures():
    """The GGUF vocabularies tokenize llama.cpp's fixture texts to exactly its recorded ids: they are the real
    tokenizers, not look-alikes."""
    for name in ("qwen2.5", "llama3", "phi3", "gemma4"):
        try:
            good, total = realtok.verify_vocab(name)
        except realtok.Unavailable as err:
            pytest.skip(f"real tokenizers are not available: {err}")
        assert good == total and total > 40, name


def test_local_llama_fast_folder_keeps_its_spaces(caplog):
    """DeepSeek-R1-Distill-Llama's folder names LlamaTokenizerFast over a byte-level tokenizer.json; transformers
    5.17 rebuilds it as a SentencePiece-style LlamaTokenizer that drops spaces. The job's loader must not."""
    from app.tokenizer import PROBE

    try:
        folder = realtok.model_folder("r1-distill-llama", "LlamaTokenizerFast")
        reference = realtok.vocab("r1-llama")
    except realtok.Unavailable as err:
        pytest.skip(f"real tokenizers are not available: {err}")
    with caplog.at_level("WARNING", logger="app.tokenizer"):
        tokenizer = load_folder(folder)
    if "encodes text differently from its tokenizer.json" not in caplog.text:
        pytest.skip("transformers loads this folder faithfully now: the workaround is not exercised")
    text = "Hello world,  how are you?\n\nFine."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(tokenizer(PROBE, add_special_tokens=False)["input_ids"]) == PROBE
    assert tokenizer.eos_token == "<｜end▁of▁sentence｜>" and tokenizer.chat_template
    rows = encode_all(Formatter(tokenizer, 4096), [Conversation(messages=KINDS["single"], source="data.jsonl:7")])
    assert [t for _, t in trained_texts(tokenizer, rows)] == [expected("r1-distill-llama", A1)]


def test_local_phi3_folder_keeps_the_space_marker_after_special_tokens(caplog):
    """Phi-3's tokenizer.json writes "<|assistant|>\\n" as "<|assistant|>", "▁", "\\n"; transformers 5.17 rebuilds a
    LlamaTokenizer folder without that "▁". The job's loader must tokenize as the model was trained."""
    try:
        folder = realtok.model_folder("phi3.5-mini", "LlamaTokenizer")
        reference = realtok.vocab("phi3")
    except realtok.Unavailable as err:
        pytest.skip(f"real tokenizers are not available: {err}")
    tokenizer = load_folder(folder)
    text = "<|user|>\nHi there<|end|>\n<|assistant|>\n"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text, add_special_tokens=False).ids
