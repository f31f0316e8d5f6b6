"""Writing outputs so that a crash, a signal or a bad path never leaves a half-written file.

Every file hybridiff writes (plans, images, reports, plots) goes through ``write_atomic``;
every path a command will write to is checked with ``check_output_file`` or
``check_output_folder`` *before* the work that produces it, so a bad ``-o`` costs one line,
not a finished compile or a generated batch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from hybridiff.errors import HybridiffError

#: Why a write fails that the user can fix: the disk or quota is full, or the folder stopped
#: being writable (a read-only remount, changed permissions).
_FULL = {errno.ENOSPC, errno.EDQUOT}
_LOCKED = {errno.EROFS, errno.EACCES, errno.EPERM}


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place. A full disk or a
    folder that became read-only is one line naming the folder; what was written before stays."""
    try:
        _replace_with(path, data)
    except OSError as e:
        if e.errno not in _FULL | _LOCKED:
            raise
        raise HybridiffError(_cannot_write(path, len(data), e)) from None


def _cannot_write(path: Path, size: int, error: OSError) -> str:
    kept = "the files written before it are kept"
    if error.errno in _FULL:
        try:
            disk = os.statvfs(path.parent)
            free = disk.f_bavail * disk.f_frsize
        except OSError:
            free = 0
        return (
            f"cannot write {path.name}: no space left in {path.parent} ({free / 1e6:.1f} MB free, {size / 1e6:.1f} MB needed); "
            f"free some space or choose another output folder ({kept})"
        )
    return f"cannot write {path.name}: {path.parent} is not writable ({error.strerror}); choose a writable place ({kept})"


def _replace_with(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (inf, nan) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def strict_json(value: Any) -> str:
    """Indented JSON that every parser reads: non-finite numbers become null."""
    return json.dumps(finite(value), indent=2, allow_nan=False) + "\n"


def _probe_writable(folder: Path, what: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hybridiff-probe-")
    except OSError as e:
        raise HybridiffError(f"{what}: cannot write in {folder} ({e.strerror}); choose a writable place") from None
    os.close(fd)
    os.unlink(probe)


def _make_folder(folder: Path, what: str) -> None:
    blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise HybridiffError(f"{what}: {blocker} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HybridiffError(f"{what}: cannot create {folder} ({e.strerror}); choose a writable place") from None


def check_output_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output file that could not be written; create its folder."""
    if path.is_dir():
        raise HybridiffError(f"{what} {path} is a folder; give a file name, e.g. {path / 'plan.json'}")
    _make_folder(path.parent, f"{what} {path}")
    _probe_writable(path.parent, f"{what} {path}")


def check_output_folder(folder: Path, what: str) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written; create it."""
    _make_folder(folder, f"{what} {folder}")
    _probe_writable(folder, f"{what} {folder}")


def remove_temporaries(folder: Path) -> None:
    """Remove the ``.NAME.*.tmp`` files ``write_atomic`` leaves when its process is killed."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
