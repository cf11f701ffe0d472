"""The data formats other tools accept train from their original files, with exact masks, or are refused once
with the fix (app/data.py).

Each format's file holds the same conversations as a `messages` file: the rows the trainer receives (token ids
and labels, through the tokenizer's chat template) must be identical, so the masks are those the messages tests
prove exact (tests/test_masks.py); in prompt/completion and Alpaca data, the prompt (history included) is context
and only the completion is trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.data import Conversation, load_conversations
from app.errors import DataError
from app.formatting import IGNORE, Formatter, encode_all
from tests.conftest import SAMPLE, read_result, run_cli, smoke_env

SYSTEM, USER, ANSWER = "You are terse.", "Write is_even(n).", "def is_even(n):\n    return n % 2 == 0"
FOLLOW_UP, SECOND = "Now is_odd(n).", "def is_odd(n):\n    return n % 2 == 1"

# The same two conversations in every format: [system?, user, assistant] and a two-turn one whose first answer
# is context (trained in `messages` only with weight 0, to compare like with like).
MESSAGES = [
    {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                  {"role": "assistant", "content": ANSWER}]},
    {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER, "weight": 0},
                  {"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": SECOND}]},
]
FORMATS = {
    "sharegpt": [
        {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": USER},
                           {"from": "gpt", "value": ANSWER}]},
        {"system": "", "conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER, "weight": 0},
                                         {"from": "human", "value": FOLLOW_UP}, {"from": "gpt", "value": SECOND}]},
    ],
    "prompt_completion": [  # TRL's conversational prompt-completion; the plain string form is tested below
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
         "completion": [{"role": "assistant", "content": ANSWER}]},
        {"prompt": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER},
                    {"role": "user", "content": FOLLOW_UP}],
         "completion": [{"role": "assistant", "content": SECOND}]},
    ],
    "alpaca": [
        {"system": SYSTEM, "instruction": USER, "input": "", "output": ANSWER},
        {"instruction": FOLLOW_UP, "input": "", "output": SECOND, "history": [[USER, ANSWER]]},
    ],
    "messages": [  # an OpenAI chat export: content parts, and keys that carry nothing to train
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": SYSTEM}]},
                      {"role": "user", "content": USER, "name": None},
                      {"role": "assistant", "content": ANSWER, "refusal": None, "annotations": [], "audio": None}],
         "id": "chatcmpl-1"},
        MESSAGES[1],
    ],
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(tokenizer, conversations: list[Conversation]) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in encode_all(Formatter(tokenizer, 4096), conversations)]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("container", ["jsonl", "json array"])
def test_each_format_gives_the_rows_of_the_same_conversations_as_messages(fmt, container, tokenizers, tmp_path):
    if container == "jsonl":
        original = _jsonl(tmp_path / f"{fmt}.jsonl", FORMATS[fmt])
    else:
        original = tmp_path / f"{fmt}.json"
        original.write_text(json.dumps(FORMATS[fmt], indent=2))  # pretty-printed, as exports are
    reference = load_conversations(_jsonl(tmp_path / "messages.jsonl", MESSAGES))
    converted = load_conversations(original)
    assert [c.format for c in converted] == [fmt, fmt]
    assert [c.messages for c in converted] == [c.messages for c in reference]
    for family in ("chatml", "llama3"):
        assert _rows(tokenizers[family], converted) == _rows(tokenizers[family], reference)


def test_prompt_is_context_and_completion_is_trained(tokenizers, tmp_path):
    """The prompt's own assistant turn (history) is shown, not trained: only the completion's tokens are."""
    tokenizer = tokenizers["chatml"]
    [conversation] = load_conversations(_jsonl(tmp_path / "pc.jsonl", FORMATS["prompt_completion"][1:]))
    [row] = encode_all(Formatter(tokenizer, 4096), [conversation])
    trained = tokenizer.decode([t for t, label in zip(row.input_ids, row.labels, strict=True) if label != IGNORE])
    assert trained == SECOND + "<|im_end|>"


def test_plain_prompt_completion_strings_become_a_user_and_an_assistant_message(tmp_path, caplog):
    rows = [{"prompt": USER, "completion": ANSWER}] * 2
    with caplog.at_level("INFO"):
        conversations = load_conversations(_jsonl(tmp_path / "plain.jsonl", rows))
    assert conversations[0].messages == [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
    assert "prompt_completion" in caplog.text and "chat template" in caplog.text  # the conversion is said once


def test_openai_export_keys_that_carry_content_are_refused_not_dropped(tmp_path):
    rows = [{"messages": [{"role": "user", "content": USER},
                          {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]}]}]
    with pytest.raises(DataError, match="tool calls"):
        load_conversations(_jsonl(tmp_path / "tools.jsonl", rows))
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": ANSWER}]}]
    with pytest.raises(DataError, match="image_url"):
        load_conversations(_jsonl(tmp_path / "image.jsonl", rows))


def test_other_message_keys_are_ignored_and_counted(tmp_path, caplog):
    rows = [{"messages": [{"role": "user", "content": USER, "timestamp": 17},
                          {"role": "assistant", "content": ANSWER, "timestamp": 18}]}]
    with caplog.at_level("INFO"):
        [conversation] = load_conversations(_jsonl(tmp_path / "keys.jsonl", rows))
    assert conversation.messages[1] == {"role": "assistant", "content": ANSWER}
    assert "timestamp (2 messages)" in caplog.text


@pytest.mark.parametrize("rows,detected,fix", [
    ([{"text": f"<|im_start|>user\n{USER}<|im_end|>"}] * 20, "pre-rendered", '{"prompt": "<the prompt>", "completion"'),
    ([{"prompt": USER, "chosen": ANSWER, "rejected": "no"}] * 20, "preference rows", "rename 'chosen' to 'completion'"),
    ([{"question": USER, "answer": ANSWER}] * 20, "no known format (keys: answer, question)", '{"conversations"'),
])
def test_a_format_that_cannot_train_is_refused_once_with_the_fix(rows, detected, fix, tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_conversations(path)
    message = err.value.message
    assert "20 bad line(s)" in message and f"{path} lines 1-20: " in message
    assert message.count(detected) == 1 and fix in message


def test_a_table_file_is_refused_once_with_the_command_that_converts_it(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\n" + f"{USER},{ANSWER}\n" * 400)
    with pytest.raises(DataError) as err:
        load_conversations(path)
    message = err.value.message
    assert "csv file" in message and "bad line" not in message
    assert f"load_dataset('csv', data_files='{path}', split='train').to_json('{tmp_path / 'train'}.jsonl')" in message


def test_identical_problems_are_grouped_with_their_lines_and_every_bad_line_is_counted(tmp_path):
    good = json.dumps(MESSAGES[0])
    lines = ["{"] * 30 + [good] + ['{"messages": [{"role": "user", "content": "hi"}]}'] * 2 + ["{"] + [good]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_conversations(path)
    message = err.value.message
    assert "33 bad line(s)" in message
    assert f"{path} lines 1-30, 34: invalid JSON" in message
    assert f"{path} lines 32-33: no assistant message" in message
    assert message.count("invalid JSON") == 1


def test_one_format_per_file(tmp_path):
    path = _jsonl(tmp_path / "two.jsonl", [MESSAGES[0], FORMATS["sharegpt"][0]])
    with pytest.raises(DataError, match=r"two.jsonl:2: a sharegpt row in a file whose first row .*:1\) is messages"):
        load_conversations(path)


def test_an_openweights_file_id_is_named_as_such(tmp_path):
    with pytest.raises(DataError) as err:
        load_conversations(Path("conversations:file-0123456789ab"))
    message = err.value.message
    assert "OpenWeights file id" in message and "ow.files.content('conversations:file-0123456789ab')" in message
    assert "Mount" not in message and "-v ./data" not in message


def test_every_untrainable_example_is_counted_and_identical_problems_grouped(tokenizers):
    """encode_all used to stop at 20 problems: the count must be the real one."""
    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    conversations = [Conversation(messages=long_prompt, source=f"data.jsonl:{i}") for i in range(1, 31)]
    conversations.append(Conversation(messages=MESSAGES[0]["messages"], source="data.jsonl:31"))
    with pytest.raises(DataError) as err:
        encode_all(Formatter(tokenizers["chatml"], 64), conversations)
    message = err.value.message
    assert message.startswith("30 of 31 example(s) cannot be trained on")
    assert "data.jsonl:1, data.jsonl:2, data.jsonl:3, data.jsonl:4, data.jsonl:5 and 25 more: " in message
    assert message.count("no assistant token is left") == 1


@pytest.mark.integration
def test_a_sharegpt_json_array_trains_and_result_json_names_its_format(tiny_model, tmp_path, monkeypatch):
    conversations = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()[:8]]
    sharegpt = [{"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                    "value": m["content"]} for m in c["messages"]]} for c in conversations]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(sharegpt))
    out = tmp_path / "out"
    assert run_cli(monkeypatch, smoke_env(tiny_model, out, training_file=path, max_steps=1), "train") == 0
    result = read_result(out)
    assert result["status"] == "completed"
    assert result["data"]["train"]["format"] == "sharegpt" and result["data"]["train"]["conversations"] == 8
