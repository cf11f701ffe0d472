"""Optional upload of the adapter/merged model to the Hugging Face Hub (FT_PUSH_TO_HUB), retried.

A failed push never loses the model: it stays on the volume and the error says where.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from app.errors import JobError, TrainingError

log = logging.getLogger(__name__)

ATTEMPTS = 4
BACKOFF_S = 5.0  # doubled after each failed attempt: 5, 10, 20 s


def push(settings, folder: Path, api=None, sleep=time.sleep) -> str:
    """Upload `folder` to settings.finetuned_model_id; returns the repo id."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=settings.token())
    repo_id = settings.finetuned_model_id
    delay = BACKOFF_S
    for attempt in range(1, ATTEMPTS + 1):
        try:
            api.create_repo(repo_id, private=settings.push_to_private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"fine-tuned: {folder.parent.name}")
            log.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
            return repo_id
        except JobError:  # SIGTERM while uploading (Interrupted): not a network error to retry
            raise
        except Exception as err:  # network, 5xx, rate limits: all worth a retry
            if attempt == ATTEMPTS:
                raise TrainingError(
                    f"FT_PUSH_TO_HUB: uploading to {repo_id} failed {ATTEMPTS} times ({type(err).__name__}: {err}). "
                    f"The model is saved at {folder}; upload it later with `huggingface-cli upload {repo_id} {folder}`."
                ) from None
            log.warning("push to %s failed (attempt %d/%d: %s); retrying in %.0f s", repo_id, attempt, ATTEMPTS,
                        type(err).__name__, delay)
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
