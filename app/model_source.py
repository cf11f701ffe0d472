"""Where FT_MODEL's files are: a local directory, or a hub id resolved through the HF cache.

Only config.json and the tokenizer are fetched before the preflight; the weights after it, so a run that
cannot fit is refused before gigabytes are downloaded. Offline (HF_HUB_OFFLINE=1), a hub id must be in
the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.errors import SettingsError
from app.settings import hf_home

METADATA = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*",
            "merges.txt", "*.model", "chat_template*"]


def resolve_model(model: str, token: str | None = None) -> Path:
    """A local folder with config.json and the tokenizer of `model` (weights not necessarily there yet)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SettingsError([f"FT_MODEL={model}: the directory has no config.json; point FT_MODEL at a "
                                 "Hugging Face model folder (config.json, tokenizer, *.safetensors)."])
        return path
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise SettingsError([f"FT_MODEL={model}: no such directory, and not a hub id (org/name). Mount the "
                             "model folder and point FT_MODEL at it, or give a hub id."])
    return _snapshot(model, token, METADATA)


def check_target_modules(model: str, target_modules: list[str], skeleton) -> None:
    """FT_TARGET_MODULES must name modules of the model: checked on the architecture built on the meta device
    from config.json (app/memory.py; no weights, no memory), so a typo fails in seconds, `check` included, not
    after loading. Names match as PEFT matches them: the whole module name or its last dotted parts."""
    if skeleton is None:
        return  # an architecture transformers cannot build from config alone: PEFT checks when adding LoRA
    names = {name: type(module).__name__ for name, module in skeleton.named_modules()}
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, kind in names.items() if kind == "Linear"})
        raise SettingsError([
            f"FT_TARGET_MODULES={','.join(target_modules)}: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not a module of FT_MODEL={model}. Its linear layers are "
            f"{', '.join(linear) or '(none found)'}; set FT_TARGET_MODULES to some of them (comma-separated)."
        ])


def fetch_weights(model: str, local: Path, token: str | None = None) -> Path:
    """Download the weights of a hub model after the preflight passed (a no-op for local folders)."""
    if Path(model).expanduser().is_dir():
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
    except (HfHubHTTPError, OSError) as err:
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
