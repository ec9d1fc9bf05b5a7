"""Files and folders written whole or not at all: through a temporary sibling and a rename.

A crash, a kill or a full disk mid-write leaves the old file (or nothing), never half a file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Below this much free space, a failed write is taken for a full disk (torch.save reports one as a
# RuntimeError without an errno).
NEARLY_FULL_BYTES = 2**20


class AtomicWriteError(OSError):
    """A write that failed; the temporary file is gone and the target is as it was."""

    def __init__(self, path: Path, cause: BaseException, free_bytes: int | None, disk_full: bool):
        super().__init__(f"could not write {path} ({cause})")
        self.path = path
        self.cause = cause
        self.free_bytes = free_bytes
        self.disk_full = disk_full


def temporary_sibling(path: Path, purpose: str = "tmp") -> Path:
    """A hidden name beside `path`, unique to this process, to write into before the rename."""
    return path.with_name(f".{path.name}.{purpose}-{os.getpid()}")


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk under `folder`, or None when the folder does not exist."""
    return shutil.disk_usage(folder).free if folder.exists() else None


def is_disk_full(err: BaseException, free: int | None = None) -> bool:
    """ENOSPC from Python I/O, as safetensors' Rust writer reports it, or a failure with (almost) no space left."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if "No space left on device" in str(err) or "StorageFull" in str(err):
        return True
    return free is not None and free < NEARLY_FULL_BYTES


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a temporary sibling of `path`, then rename it to `path`.

    On failure the temporary file is removed and `AtomicWriteError` says whether the disk was full
    (measured before the temporary file frees its space).
    """
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except Exception as err:
        free = free_bytes(path.parent)
        tmp.unlink(missing_ok=True)
        raise AtomicWriteError(path, err, free, is_disk_full(err, free)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(data: dict[str, Any], path: Path) -> None:
    """JSON (indented, one trailing newline) through `write_file_atomically`."""
    write_file_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def replace_folder(finished: Path, final: Path) -> None:
    """Rename the finished folder to `final`; an existing `final` is moved aside first and removed after."""
    if not final.exists():
        finished.rename(final)
        return
    old = temporary_sibling(final, "old")
    final.rename(old)
    finished.rename(final)
    shutil.rmtree(old)
