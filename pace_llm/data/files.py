"""The content hashes of a task's local data files (part of the task cache's key) and what
identifies a run's data in its checkpoints (resume refuses data that changed)."""

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
    out = {}
    for name in _local_files(paths):
        path = Path(name)
        try:
            out[name] = file_sha256(path) if path.is_file() else "missing"
        except OSError as exc:  # unreadable: reading it reports that
            out[name] = f"unreadable: {exc.strerror}"
    return out


def _local_files(paths: tuple[str | None, ...]) -> list[str]:
    """The local files these data paths may read (see :func:`data_files`), sorted."""
    files: set[Path] = set()
    for given in filter(None, paths):
        path = Path(given).expanduser().resolve()
        if not looks_like_path(given, LOCAL_EXTS):
            continue
        if path.is_dir():
            files |= {p for p in path.iterdir() if p.suffix.lower() in LOCAL_EXTS}
        elif path.stem == "train" and path.parent.is_dir():
            files |= {p for p in path.parent.iterdir() if p.suffix.lower() in LOCAL_EXTS and
                      p.stem in (*EVAL_NAMES, "train", "validation_matched", "dev_matched")}
        files.add(path)
    return [str(path) for path in sorted(files)]


# ------------------------------------------------------------------ what identifies the data
EDGE = 1 << 20
"""Bytes hashed at each end of a streamed file (its identity: size, mtime and both ends)."""


def edges_sha256(path: Path) -> str:
    """SHA-256 of a file's first and last MiB (the whole file when it is smaller than 2 MiB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(EDGE))
        size = path.stat().st_size
        if size > EDGE:
            f.seek(max(EDGE, size - EDGE))
            digest.update(f.read())
    return digest.hexdigest()


def stream_identity(paths: tuple[str | None, ...]) -> dict[str, dict[str, object] | str]:
    """What identifies streamed data files without reading them whole (a stream may be larger
    than a disk read per start should be), for the files :func:`data_files` names: each file's
    size and the SHA-256 of its first and last MiB (the whole file up to 2 MiB); a larger file,
    whose middle is not hashed, also by its modification time (ns)."""
    out: dict[str, dict[str, object] | str] = {}
    for name in _local_files(paths):
        path = Path(name)
        try:
            stat = path.stat()
            out[name] = {"size": stat.st_size, "edges_sha256": edges_sha256(path)}
            if stat.st_size > 2 * EDGE:
                out[name]["mtime_ns"] = stat.st_mtime_ns
        except OSError as exc:
            out[name] = f"unreadable: {exc.strerror}"
    return out


def _file_change(name: str, old: object, new: object) -> str:
    if new is None:
        return f"data file {name}: no longer read (the task's files changed)"
    if old is None:
        return f"data file {name}: read now, not when the checkpoint was written"
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"data file {name}: its content changed (SHA-256 {old!s:.12} -> {new!s:.12})"
    what = [f"{key} {old.get(key)} -> {new.get(key)}" for key in ("size", "mtime_ns")
            if old.get(key) != new.get(key)]  # (mtime: a file over 2 MiB, middle unhashed)
    if old.get("edges_sha256") != new.get("edges_sha256"):
        what.append("its first or last MiB changed")
    return f"data file {name}: {', '.join(what)}"


PARTS = {"code": "pace_llm's data code (tokenizing, templates, task definitions)",
         "versions": "the versions of transformers / tokenizers / jinja2",
         "tokenizer": "the tokenizer", "task": "the task's settings", "data": "the data settings"}


def data_changes(old: dict, new: dict, where: str = "") -> list[str]:
    """How the data identified by ``new`` differs from ``old`` (both from a task's
    ``TaskData.identity``): each changed file named, else the part of the task cache's key that
    changed; empty when they are the same data."""
    if old == new:
        return []
    if old.get("kind") != new.get("kind"):
        return [(f"{where}the data is read another way now ({old.get('kind')} -> "
                 f"{new.get('kind')})")]
    if old.get("kind") == "mix":
        olds, news = old.get("sources", []), new.get("sources", [])
        if len(olds) != len(news):
            return [f"the mixture has {len(news)} sources, the checkpoint's had {len(olds)}"]
        return [c for i, (a, b) in enumerate(zip(olds, news))
                for c in data_changes(a, b, f"data.mix[{i}]: ")]
    files_old, files_new = old.get("files", {}), new.get("files", {})
    changes = [where + _file_change(name, files_old.get(name), files_new.get(name))
               for name in sorted(set(files_old) | set(files_new))
               if files_old.get(name) != files_new.get(name)]
    if changes:
        return changes
    parts_old, parts_new = old.get("parts", {}), new.get("parts", {})
    return [f"{where}the tokenized data differ: {PARTS.get(k, k)} changed"
            for k in sorted(set(parts_old) | set(parts_new))
            if parts_old.get(k) != parts_new.get(k)] or [f"{where}the task cache key changed"]
