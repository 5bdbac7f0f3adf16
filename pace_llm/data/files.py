"""The content hashes of a task's local data files (part of the task cache's key)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pace_llm.data.sources import EVAL_NAMES, LOCAL_EXTS, looks_like_path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def data_files(paths: tuple[str | None, ...]) -> dict[str, str]:
    """SHA-256 of each local file that :func:`load_splits` (or GLUE's layouts) may read for
    these paths: a file and its test/validation/dev siblings, or a directory's data files.
    Hub ids have none; a missing or unreadable file is noted as such."""
    files: set[Path] = set()
    for given in filter(None, paths):
        path = Path(given).expanduser().resolve()
        if not looks_like_path(given, LOCAL_EXTS):
            continue
        if path.is_dir():
            files |= {p for p in path.iterdir() if p.suffix.lower() in LOCAL_EXTS}
        elif path.stem == "train" and path.parent.is_dir():
            files |= {p for p in path.parent.iterdir() if p.suffix == path.suffix and p.stem in
                      (*EVAL_NAMES, "train", "validation_matched", "dev_matched")}
        files.add(path)
    out = {}
    for path in sorted(files):
        try:
            out[str(path)] = file_sha256(path) if path.is_file() else "missing"
        except OSError as exc:  # unreadable: reading it reports that
            out[str(path)] = f"unreadable: {exc.strerror}"
    return out
