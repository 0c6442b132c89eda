"""An adapter folder written and read as one unit.

The folder keeps the plain layout peft and the Hub expect (adapter_model.safetensors,
adapter_config.json, README.md side by side), so one save cannot be a single rename. Instead:

1. every new file is written in full to a hidden temp file beside its final name and fsynced;
2. a small journal (`.peftvision-commit`) naming those temp files and the stale files to delete
   is written and renamed into place: **this rename is the commit point**;
3. the temp files are renamed over the final names, stale files deleted, the journal removed.

A crash before step 2 leaves the old adapter (its temp files are discarded later); a crash after
it leaves a journal that the next save or load under the lock rolls forward to the new adapter.
So the folder always holds the complete old or the complete new adapter. Writers and readers
serialise through `flock` on the folder itself (no lock file is left behind); where `fcntl` does
not exist (Windows) saves are still journaled but not serialised.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

JOURNAL = ".peftvision-commit"
_TEMP_SUFFIX = ".pvtmp"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@contextlib.contextmanager
def locked(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold an flock on `folder` (shared for readers, exclusive for writers)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def temp_name(name: str, token: str) -> str:
    """Hidden name of a file being written (starts with '.<name>.' like the final file's)."""
    return f".{name}.{token}{_TEMP_SUFFIX}"


def write_durable(path: Path, data: bytes) -> None:
    """Create `path` with `data`, fsynced, with the usual umask permissions (mkstemp's are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def replace_file(path: Path, data: bytes) -> None:
    """Write one file atomically: a temp file beside it, fsynced, renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_name(path.name, secrets.token_hex(6))
    write_durable(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be fsynced there
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_files(folder: Path, files: dict[str, bytes], remove: Iterable[str] = ()) -> None:
    """Write `files` (name -> bytes) into `folder` and delete `remove`, as one unit."""
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder, exclusive=True):
        recover(folder)
        token = secrets.token_hex(6)
        staged: dict[str, str] = {}
        try:
            for name, data in files.items():
                write_durable(folder / temp_name(name, token), data)
                staged[name] = temp_name(name, token)
            plan = {"staged": staged,
                    "remove": sorted(n for n in remove if n not in files and (folder / n).exists())}
            journal_tmp = folder / temp_name(JOURNAL, token)
            write_durable(journal_tmp, json.dumps(plan).encode())
            _fsync_dir(folder)
            os.replace(journal_tmp, folder / JOURNAL)  # commit point
        except BaseException:
            for tmp in [*staged.values(), temp_name(JOURNAL, token)]:
                (folder / tmp).unlink(missing_ok=True)
            raise
        _roll_forward(folder, plan)


def _roll_forward(folder: Path, plan: dict) -> None:
    for name, tmp in plan["staged"].items():
        if (folder / tmp).exists():  # a recovery may find some already renamed
            os.replace(folder / tmp, folder / name)
    for name in plan["remove"]:
        (folder / name).unlink(missing_ok=True)
    _fsync_dir(folder)
    (folder / JOURNAL).unlink()
    _fsync_dir(folder)


def needs_recovery(folder: Path) -> bool:
    return (folder / JOURNAL).exists() or any(
        p.name.endswith(_TEMP_SUFFIX) for p in folder.iterdir() if p.name.startswith("."))


def recover(folder: Path) -> None:
    """Finish a committed save that was interrupted, and delete temp files of uncommitted ones.

    Call with the exclusive lock held."""
    journal = folder / JOURNAL
    if journal.exists():
        try:
            plan = json.loads(journal.read_text())
            plan["staged"], plan["remove"]  # noqa: B018 - the shape is checked here
        except (ValueError, KeyError, TypeError):
            journal.unlink()  # a journal is renamed into place whole; a broken one is not ours
        else:
            _roll_forward(folder, plan)
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(_TEMP_SUFFIX):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def reading(folder: Path) -> Iterator[None]:
    """Hold the folder steady while reading it: no save can be half applied meanwhile.

    An interrupted save is first rolled forward (which needs write access; a read-only folder
    is read as it is)."""
    if fcntl is None or not folder.is_dir():
        yield
        return
    if needs_recovery(folder) and os.access(folder, os.W_OK):
        with locked(folder, exclusive=True):
            recover(folder)
    with locked(folder, exclusive=False):
        yield
