"""Writes that appear whole or not at all: a file or a directory is written beside its place
and renamed into it, so a kill or a full disk never leaves half of one (checkpoints, exports,
records, the offline base model). A write the filesystem refuses (no space, a file-size limit,
a read-only filesystem, no permission) is one :class:`WriteFault` message naming the path and
what to do, never a traceback; the half-written copy is removed."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pace_llm.errors import UserError

FAULTS = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EFBIG: "file size limit",
          errno.EROFS: "read-only", errno.EACCES: "no permission", errno.EPERM: "no permission"}
"""errno -> the kind of write fault (the rest of an OSError is no fault of the filesystem's)."""
# torch.save reports a short write without an errno; safetensors as text: "No space left on
# device (os error 28)", "File too large (os error 27)", "Read-only file system (os error 30)"
SHORT_WRITE = ("file write failed", "unexpected pos")


class WriteFault(UserError):
    """The filesystem refused a write: ``kind`` is full, file size limit, read-only or no
    permission; ``path`` what was being written."""

    def __init__(self, message: str, kind: str, path: Path):
        super().__init__(message)
        self.kind, self.path = kind, path


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies under it (both resolved by the caller)."""
    return path == root or root in path.parents


def fault_kind(exc: BaseException, where: Path) -> str | None:
    """The kind of write fault ``exc`` is (see :data:`FAULTS`), or None: not a fault of the
    filesystem. A short write without an errno is told apart by the space and limit left."""
    code = getattr(exc, "errno", None)
    if code is None and (found := re.search(r"os error (\d+)", str(exc))):
        code = int(found[1])
    if code in FAULTS:
        return FAULTS[code]
    if not any(text in str(exc) for text in SHORT_WRITE):
        return None
    if _file_size_limit() is not None and free_bytes(where) > (1 << 20):
        return "file size limit"
    return "full"


def free_bytes(where: Path) -> int:
    """Free bytes on the filesystem of ``where`` (its nearest existing ancestor); 0 unknown."""
    for path in (where, *where.parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free
            except OSError:
                return 0
    return 0


def _file_size_limit() -> int | None:
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def fault_message(kind: str, what: str, path: Path, need: int | None = None,
                  written: int | None = None) -> str:
    """One sentence for a write fault: what was written where, the bytes involved, the fix."""
    free = free_bytes(path)
    sizes = "; ".join(part for part in (
        f"wrote {written} bytes" if written else "",
        f"it needs about {need} bytes" if need else "", f"{free} bytes free") if part)
    if kind == "full":
        return (f"no space left on the device while writing {what} {path} ({sizes}); free space "
                "and try again")
    if kind == "file size limit":
        return (f"a file of {what} {path} reached this process's file-size limit (ulimit -f: "
                f"{_file_size_limit()} bytes; {sizes}): the disk is not full; raise the limit "
                "(ulimit -f unlimited) and try again")
    if kind == "read-only":
        return f"cannot write {what} {path}: the filesystem is read-only; write it elsewhere"
    return (f"cannot write {what} {path}: permission denied; write it elsewhere or fix the "
            "folder's permissions")


def as_fault(exc: BaseException, what: str, path: Path, need: int | None = None,
             written: int | None = None) -> WriteFault | None:
    """``exc`` as one WriteFault message, or None when it is not a filesystem fault."""
    kind = fault_kind(exc, path)
    if kind is None:
        return None
    return WriteFault(fault_message(kind, what, path, need, written), kind, path)


def atomic_write(path: Path, text: str) -> None:
    """Write text to path through a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        fault = as_fault(exc, "file", path, need=len(text.encode()))
        if fault is None:
            raise
        raise fault from None


def refuse_nonempty(out_dir: str | Path, overwrite: bool) -> None:
    """UserError if out_dir holds anything and overwrite is off."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another directory or pass "
                        "overwrite=True (CLI: --overwrite) to replace it")


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False, what: str = "directory"
               ) -> Iterator[Path]:
    """Yield a temporary directory that replaces out_dir when the block ends without error.
    What it holds gets the permissions the user's umask gives new files (mkdtemp makes 0700),
    so a server under another user can read an export. A filesystem fault while writing is a
    :class:`WriteFault` naming ``what`` and out_dir; the temporary directory is removed."""
    out = Path(out_dir)
    refuse_nonempty(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        fault = as_fault(exc, what, out)
        if fault is None:
            raise
        raise fault from None
    try:
        yield tmp
        _umask_permissions(tmp)
        _replace(tmp, out)
    except BaseException as exc:
        written = _size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        fault = as_fault(exc, what, out, written=written) if isinstance(exc, Exception) else None
        if fault is None:
            raise
        raise fault from None


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _umask_permissions(root: Path) -> None:
    """Directories 0777 and files 0666, less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def copy_dir(src: Path, dst: Path) -> None:
    """A copy of a directory that replaces ``dst`` whole."""
    with atomic_dir(dst, overwrite=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
