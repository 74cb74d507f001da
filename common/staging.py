"""Write a folder all-or-nothing: build it beside its destination, then rename it into place.

A reader of DEST sees the old folder, or nothing, or the whole new one; never a half-written
one. One owner for the shard tool's split, the testbed's model writers and its corpus cache.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

PARTIAL_TAG = "partial"  # .DEST.partial-XXXXXXXX: the folder being written
OLD_TAG = "old"  # .DEST.old-XXXXXXXX: a forced DEST on its way out
NAME_TRIES = 100  # random names tried before giving up (a collision is astronomically rare)


def _fresh_dir(parent: str, prefix: str) -> str:
    """A new empty folder PARENT/PREFIXxxxxxxxx made with os.mkdir's mode (0777 less the umask,
    as `mkdir` makes it), unlike tempfile.mkdtemp's 0700. Raises OSError."""
    for _ in range(NAME_TRIES):
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: no free name for {prefix}*")


@contextmanager
def staged_dir(dest: str, force: bool = False) -> Iterator[str]:
    """Yields an empty folder beside DEST (same file system, so the rename is atomic) with the
    permissions `mkdir` gives; when the block ends normally it becomes DEST. An existing DEST
    is refused (FileExistsError, before the block runs and again at the rename) unless FORCE;
    forced, the old DEST is removed only once the new one is in place. On any exception,
    Ctrl-C included, the staged folder is removed and DEST is left as it was.
    Raises FileExistsError, OSError."""
    dest = os.path.abspath(dest)
    if not force and os.path.lexists(dest):
        raise FileExistsError(f"{dest} exists")
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    staging = _fresh_dir(parent, f".{name}.{PARTIAL_TAG}-")
    try:
        yield staging
        _move_into_place(staging, dest, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def give_files_folder_mode(folder: str) -> None:
    """Every file directly in FOLDER gets the folder's read and write bits (what `open` gives a
    new file under the umask the folder was made with): some writers (safetensors through
    transformers' save_pretrained) make their files 0600. Raises OSError."""
    mode = stat.S_IMODE(os.stat(folder).st_mode) & 0o666
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, mode)


def _move_into_place(staging: str, dest: str, force: bool) -> None:
    if not os.path.lexists(dest):
        os.rename(staging, dest)
        return
    if not force:  # appeared while the block ran
        raise FileExistsError(f"{dest} exists")
    # The old DEST steps aside into a private folder and is put back if the new one fails to
    # take its place; it is deleted only after.
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.{OLD_TAG}-",
                             dir=os.path.dirname(dest))
    old = os.path.join(trash, OLD_TAG)
    try:
        os.rename(dest, old)
    except BaseException:
        os.rmdir(trash)
        raise
    try:
        os.rename(staging, dest)
    except BaseException:
        os.rename(old, dest)  # should this fail too, the old DEST stays in TRASH, not deleted
        os.rmdir(trash)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def write_file_atomic(path: str, data: bytes, durable: bool = False) -> None:
    """PATH holds DATA whole, or what it held before: DATA goes to a staged file beside PATH
    (same file system; the mode `open` gives under the umask; a random name, so writers at
    the same time never share one), which is then renamed over it. durable: on disk before
    the rename (fsync), for what must survive a power cut. On any exception, Ctrl-C included,
    the staged file is removed. Raises OSError."""
    parent, name = os.path.split(os.path.abspath(path))
    for _ in range(NAME_TRIES):
        staging = os.path.join(parent, f".{name}.{PARTIAL_TAG}-{secrets.token_hex(4)}")
        try:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"{parent}: no free name for .{name}.{PARTIAL_TAG}-*")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        try:
            os.unlink(staging)
        except FileNotFoundError:
            pass
        raise
