"""Hugging Face Hub transfer (huggingface_hub is imported lazily)."""

from __future__ import annotations

from pathlib import Path

from .errors import AdapterLoadError


def download_adapter(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local cache) an adapter repo and return its folder."""
    if repo_id.count("/") != 1:
        raise AdapterLoadError(f"{repo_id!r} is neither an existing folder nor a Hub repo id "
                               "of the form 'user/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["adapter_model.safetensors", "adapter_config.json"]))
    except RepositoryNotFoundError as exc:
        raise AdapterLoadError(f"Hub repo {repo_id!r} not found (or private without a token)") from exc
    except LocalEntryNotFoundError as exc:
        raise AdapterLoadError(f"{repo_id!r} is not in the local Hub cache and the Hub cannot be "
                               "reached (offline?); download it once online or pass a folder") from exc
    except HfHubHTTPError as exc:
        raise AdapterLoadError(f"could not download {repo_id!r} from the Hub: {exc}") from exc
