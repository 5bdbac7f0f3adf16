"""Writes that appear whole or not at all: a file or a directory is written beside its place
and renamed into it, so a kill or a full disk never leaves half of one (checkpoints, exports,
records, the offline base model)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pace_llm.errors import UserError


def atomic_write(path: Path, text: str) -> None:
    """Write text to path through a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)



def refuse_nonempty(out_dir: str | Path, overwrite: bool) -> None:
    """UserError if out_dir holds anything and overwrite is off."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another directory or pass "
                        "overwrite=True (CLI: --overwrite) to replace it")


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces out_dir when the block ends without error.
    What it holds gets the permissions the user's umask gives new files (mkdtemp makes 0700),
    so a server under another user can read an export."""
    out = Path(out_dir)
    refuse_nonempty(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _umask_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
