"""Where FT_MODEL's files are: a local directory, or a hub id resolved through the HF cache.

Only config.json and the tokenizer are fetched before the preflight; the weights after it, so a run that
cannot fit is refused before gigabytes are downloaded. Offline (HF_HUB_OFFLINE=1), a hub id must be in
the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.errors import SettingsError

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
            f"FT_MODEL={repo_id}: not in the Hugging Face cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}) "
            "and the hub cannot be reached (offline). Download it once where the hub is reachable "
            f"(huggingface-cli download {repo_id}) into the cache volume, or point FT_MODEL at a local folder."
        ]) from None
    except RepositoryNotFoundError:
        raise SettingsError([f"FT_MODEL={repo_id}: no such model on the hub (or it is gated/private and HF_TOKEN "
                             "is missing or lacks access)."]) from None
    except (HfHubHTTPError, OSError) as err:
        raise SettingsError([f"FT_MODEL={repo_id}: could not be fetched from the hub ({type(err).__name__}). "
                             "Check the network and HF_TOKEN, or point FT_MODEL at a local folder."]) from None
