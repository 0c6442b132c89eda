"""Hugging Face Hub transfer of adapter folders. huggingface_hub is imported lazily, only when
the Hub is used. This module moves folders and knows nothing of models (sharing.py saves then
pushes; checkpoint.py downloads then loads), so nothing imports in a cycle.

push = one `upload_folder` commit of a saved adapter folder (with its model card);
pull = `snapshot_download` of the adapter files (cache, token and HF_HUB_OFFLINE respected).
"""

from __future__ import annotations

from pathlib import Path

from .errors import AdapterLoadError

ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json"]


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None,
                token: str | None = None) -> str:
    """Upload a saved adapter folder to `repo_id` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                             commit_message=commit_message or "Upload peftvision adapter")
    return getattr(info, "commit_url", str(info))


def download_adapter(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """Download (or find in the local cache) an adapter repo and return its folder."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise AdapterLoadError(f"{repo_id!r} is neither an existing folder nor a Hub repo id "
                               "of the form 'user/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token,
                                        allow_patterns=ADAPTER_FILES, library_name="peftvision"))
    except RepositoryNotFoundError as exc:
        raise AdapterLoadError(f"Hub repo {repo_id!r} not found (or private: log in with "
                               "`hf auth login` or pass token=...)") from exc
    except RevisionNotFoundError as exc:
        raise AdapterLoadError(f"Hub repo {repo_id!r} has no revision {revision!r}") from exc
    except LocalEntryNotFoundError as exc:
        raise AdapterLoadError(f"{repo_id!r}{at} is not in the local Hub cache and the Hub cannot "
                               "be reached (offline, or HF_HUB_OFFLINE=1); download it once online "
                               "or pass a local folder") from exc
    except HfHubHTTPError as exc:
        raise AdapterLoadError(f"could not download {repo_id!r}{at} from the Hub: {exc}") from exc
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise AdapterLoadError(f"Hub repo {repo_id!r}{at} holds no peftvision adapter "
                               f"(missing {', '.join(missing)})")
    return folder
