"""Files written atomically: a crash or a kill at any moment leaves either the previous file
or the complete new one (adapters, PEFT folders, checkpoints all go through here)."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable

from safetensors.torch import save_file
from torch import Tensor

from .errors import ShiraAdapterError


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run `write(tmp)` on a new temp file in the target's folder, flush it to disk, then
    `os.replace` it over `path`: a crash or a kill at any moment leaves either the previous
    file or the complete new one at `path` (at worst a stray `.shira-*.tmp` beside it).

    The temp file gets the permissions the target had (or the umask's default), not
    mkstemp's 0600, so replacing an adapter does not make it unreadable to other users."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        example = os.path.join(path, "adapter.safetensors")
        raise ShiraAdapterError(f"{path} is a directory; give a file path (e.g. {example})")
    if not os.path.isdir(folder):
        raise ShiraAdapterError(f"{path}: the folder {folder} does not exist")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    for _ in range(100):
        tmp = os.path.join(folder, f".shira-{os.getpid()}-{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{folder}: cannot create a unique temp file")
    try:
        os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        write(tmp)
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename publishes it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Persist the rename itself (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_file(tensors: dict[str, Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors `save_file`, atomically (see `_atomic_write`)."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically (see `_atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)
