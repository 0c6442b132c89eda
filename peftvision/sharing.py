"""Share an adapter: save it to a temporary folder and push that folder to the Hub in one commit."""

from __future__ import annotations

import tempfile

from torch import nn

from .checkpoint import save_adapter
from .hub import push_folder


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None,
                token: str | None = None, tags: list[str] | None = None,
                metrics: dict[str, float] | None = None) -> str:
    """Upload the model's adapter (weights, config, model card) to `repo_id` in one commit.

    `tags` go into the card's metadata (e.g. ["medical-imaging"]); `metrics` (name -> value)
    are listed in the card. Returns the URL of the commit."""
    with tempfile.TemporaryDirectory(prefix="peftvision-push-") as folder:
        save_adapter(model, folder, tags=tags, metrics=metrics)  # fails early, before any upload
        return push_folder(folder, repo_id, private=private, revision=revision,
                           commit_message=commit_message, token=token)
