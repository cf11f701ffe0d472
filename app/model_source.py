"""Where FT_MODEL's files are: a local directory, or a hub id resolved through the HF cache.

Only config.json and the tokenizer are fetched before the preflight; the weights after it, so a run that
cannot fit is refused before gigabytes are downloaded. Offline (HF_HUB_OFFLINE=1), a hub id must be in
the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.errors import JobError, SettingsError, clip
from app.settings import hf_home

METADATA = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*",
            "merges.txt", "*.model", "chat_template*"]


def resolve_model(model: str, token: str | None = None) -> Path:
    """A local folder with config.json and the tokenizer of `model` (weights not necessarily there yet)."""
    path = Path(model).expanduser()
    if _is_dir(path):
        if not (path / "config.json").is_file():
            raise SettingsError([f"FT_MODEL={clip(model)}: the directory has no config.json; point FT_MODEL at a "
                                 "Hugging Face model folder (config.json, tokenizer, *.safetensors)."])
        return path
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise SettingsError([f"FT_MODEL={clip(model)}: no such directory, and not a hub id (org/name). Mount the "
                             "model folder and point FT_MODEL at it, or give a hub id."])
    return _snapshot(model, token, METADATA)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the file system, say: not a folder
        return False


def check_target_modules(model: str, target_modules: list[str], skeleton) -> None:
    """FT_TARGET_MODULES must name modules of the model: checked on the architecture built on the meta device
    from config.json (app/memory.py; no weights, no memory), so a typo fails in seconds, `check` included, not
    after loading. Names match as PEFT matches them: the whole module name or its last dotted parts."""
    if skeleton is None:
        return  # an architecture transformers cannot build from config alone: PEFT checks when adding LoRA
    adaptable = _adaptable_types()
    modules = dict(skeleton.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, (adaptable[0], adaptable[-1]))})
    missing, wrong = [], {}
    for target in target_modules:
        matched = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
        if not matched:
            missing.append(target)
        for module in matched:
            if not isinstance(module, adaptable):
                wrong.setdefault(target, type(module).__name__)
    if not missing and not wrong:
        return
    listed = clip(",".join(target_modules))
    problems = []
    if missing:
        problems.append(f"{', '.join(clip(m, 60) for m in missing[:10])} {'is' if len(missing) == 1 else 'are'} not a "
                        f"module of FT_MODEL={clip(model)}")
    for target, kind in list(wrong.items())[:10]:
        problems.append(f"{clip(target, 60)} names {kind} modules, which LoRA cannot adapt (only linear layers, "
                        "embeddings and convolutions)")
    raise SettingsError([
        f"FT_TARGET_MODULES={listed}: {'; '.join(problems)}. Its linear layers are "
        f"{clip(', '.join(linear) or '(none found)', 400)}; set FT_TARGET_MODULES to some of them (comma-separated)."
    ])


def _adaptable_types() -> tuple[type, ...]:
    """The module classes PEFT's LoRA can wrap (peft 0.21 lora/layer.py dispatch): a target naming anything else
    fails in get_peft_model, after the weights loaded."""
    import torch
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    # The linear kinds first and last: check_target_modules lists those as the hint.
    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


# --- the base model's identity in the job id ----------------------------------------------------------------------
# New weights at the same FT_MODEL path are another job. Hashing every weight (tens of GB) would cost minutes, so the
# fingerprint is cheap: each file's name and size; the whole content of small files (config, tokenizer, template);
# for weight files, safetensors' header (tensor names, dtypes, shapes, offsets) and FINGERPRINT_SAMPLES blocks of
# the weights spread over the file (retrained weights differ everywhere, so sampled blocks differ). A hub id is
# identified by the snapshot's commit.
SMALL_FILE_BYTES = 64 * 2**20  # hashed whole below this (tokenizer.json is ~10 MB)
FINGERPRINT_SAMPLES = 64  # blocks of FINGERPRINT_BLOCK bytes read from each larger file
FINGERPRINT_BLOCK = 4096
MAX_SAFETENSORS_HEADER = 100 * 2**20  # safetensors' own limit
SKIPPED_SUFFIXES = (".md", ".txt.lock", ".lock")  # model cards and download locks do not change the model


def model_fingerprint(model: str, model_path: Path) -> str:
    """A short hash that changes when the base model's files change (see above); cheap for a 70B folder."""
    import hashlib

    if not _is_dir(Path(model).expanduser()):  # a hub id: resolve_model gave its snapshot, named by its commit
        return f"hub:{model_path.name}"
    digest = hashlib.sha256()
    for path in sorted(Path(model_path).iterdir()):
        if path.name.startswith(".") or path.name.endswith(SKIPPED_SUFFIXES) or path.is_dir():
            continue
        digest.update(f"{path.name}\0".encode())
        digest.update(_file_fingerprint(path, model))
    return digest.hexdigest()[:16]


def _file_fingerprint(path: Path, model: str) -> bytes:
    import hashlib
    import struct

    from app.safeio import InputError, open_input

    try:
        handle = open_input(path, "FT_MODEL", 2**62)  # a regular file (a FIFO would hang the loader): any size
    except InputError as err:
        raise SettingsError([f"FT_MODEL={clip(model)}: {path.name} {err.message.split(': ', 1)[-1]}"]) from None
    except OSError as err:
        raise SettingsError([f"FT_MODEL={clip(model)}: {path.name} cannot be read ({err.strerror})."]) from None
    digest = hashlib.sha256()
    with handle:
        size = handle.size
        digest.update(str(size).encode())
        if size <= SMALL_FILE_BYTES:
            while block := handle.read():
                digest.update(block)
            return digest.digest()
        if path.suffix == ".safetensors":  # 8 bytes of header length, then the header's JSON
            length = struct.unpack("<Q", handle.read(8))[0]
            remaining = min(length, MAX_SAFETENSORS_HEADER, size - 8)
            while remaining > 0 and (block := handle.read(remaining)):
                digest.update(block)
                remaining -= len(block)
        for index in range(FINGERPRINT_SAMPLES):
            handle.seek(index * (size - FINGERPRINT_BLOCK) // (FINGERPRINT_SAMPLES - 1))
            digest.update(handle.read(FINGERPRINT_BLOCK))
    return digest.digest()


def fetch_weights(model: str, local: Path, token: str | None = None) -> Path:
    """Download the weights of a hub model after the preflight passed (a no-op for local folders)."""
    if _is_dir(Path(model).expanduser()):
        return local
    return _snapshot(model, token, None)


def _snapshot(repo_id: str, token: str | None, patterns: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, token=token))
    except LocalEntryNotFoundError:
        raise SettingsError([
            f"FT_MODEL={repo_id}: not in the Hugging Face cache (HF_HOME={hf_home()}) "
            "and the hub cannot be reached (offline). Download it once where the hub is reachable "
            f"(hf download {repo_id}) into the cache volume, or point FT_MODEL at a local folder."
        ]) from None
    except RepositoryNotFoundError:
        raise SettingsError([f"FT_MODEL={repo_id}: no such model on the hub (or it is gated/private and HF_TOKEN "
                             "is missing or lacks access)."]) from None
    except JobError:  # SIGTERM while downloading
        raise
    except (HfHubHTTPError, OSError, Exception) as err:  # an HTTP library's own errors too (a bad header, TLS)
        raise SettingsError([f"FT_MODEL={repo_id}: could not be fetched from the hub ({type(err).__name__}). "
                             "Check the network and HF_TOKEN, or point FT_MODEL at a local folder."]) from None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
PREFETCH_CHUNK = 8 * 2**20  # bytes per read: large sequential reads, the GIL released while each one waits


def prefetch_weights(model_path: Path):
    """Read a local model folder's weight files once in a background thread, so that the page cache holds them
    when the backend loads the model: the disk works while the libraries import (unsloth alone takes ~25 s).
    Skipped when the weights would take more than half of the memory available (they would evict each other),
    and for hub models (their weights are fetched after the preflight). Returns the thread, or None."""
    import threading

    files = [p for p in sorted(Path(model_path).glob("*")) if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    total = sum(p.stat().st_size for p in files)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 0
    if not files or total > available / 2:
        return None

    def read_all() -> None:
        buffer = bytearray(PREFETCH_CHUNK)
        for path in files:
            try:
                with open(path, "rb", buffering=0) as handle:
                    while handle.readinto(buffer):
                        pass
            except OSError:
                return  # a prefetch only: the load itself reports a real problem

    thread = threading.Thread(target=read_all, name="prefetch-weights", daemon=True)
    thread.start()
    return thread
