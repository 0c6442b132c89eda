"""Hugging Face Hub transfer of adapter folders. huggingface_hub is imported lazily, only when
the Hub is used. This module moves folders and knows nothing of models (sharing.py saves then
pushes; loading.py downloads then loads), so nothing imports in a cycle.

push = one `upload_folder` commit of a saved adapter folder (with its model card);
pull = `snapshot_download` of the adapter files (cache, token and HF_HUB_OFFLINE respected).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from .errors import AdapterLoadError, OfflineError

ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json"]
# peft's multi-adapter layout: every adapter but "default" in a subfolder named after it
SUBFOLDER_FILES = [f"*/{name}" for name in ADAPTER_FILES]


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None,
                token: str | None = None) -> str:
    """Upload a saved adapter folder to `repo_id` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    reason = offline_reason()
    if reason:  # fail at once rather than after a minute of retries
        raise OfflineError(f"cannot push to {repo_id!r}: the Hub is unreachable ({reason}). Pushing "
                           "needs network access; the adapter folder is unchanged, push it later")
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
        with offline_if_unreachable():
            folder = Path(snapshot_download(repo_id, revision=revision, token=token,
                                            allow_patterns=ADAPTER_FILES + SUBFOLDER_FILES,
                                            library_name="peftvision"))
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
    if missing and not any((sub / ADAPTER_FILES[1]).is_file() for sub in folder.iterdir() if sub.is_dir()):
        raise AdapterLoadError(f"Hub repo {repo_id!r}{at} holds no peftvision adapter "
                               f"(missing {', '.join(missing)})")
    return folder


def offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached ("HF_HUB_OFFLINE is set", "no route to huggingface.co:443:
    ..."), or None when it answers a TCP connection within `timeout` seconds. One attempt, no
    retries: huggingface_hub retries a failed request for about a minute before giving up."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"no connection to {host}:{port}: {exc}"
    return None


@contextlib.contextmanager
def offline_if_unreachable() -> Iterator[str | None]:
    """Within the block, huggingface_hub works in offline mode (local cache only, no retries)
    when the Hub is unreachable. Yields offline_reason()."""
    from huggingface_hub import constants

    reason = offline_reason()
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or reason is not None  # read by each download call
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = previous
