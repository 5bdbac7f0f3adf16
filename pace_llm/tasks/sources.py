"""Task rows from local files (jsonl, json, parquet) or the Hugging Face hub.

Every row keeps its 1-based number so that an error can name the file and the row. In a
jsonl file the row number is the line number; in a headered TSV it is the data row, and the
message adds the line (``row 5 (line 6)``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pace_llm.errors import UserError

log = logging.getLogger(__name__)

LOCAL_EXTS = (".jsonl", ".json", ".parquet", ".tsv")
EVAL_NAMES = ("test", "validation", "dev")


@dataclass
class Rows:
    """Rows of one split: ``items`` holds (row number, row dict) pairs; ``source`` names it."""

    source: str
    items: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    header_lines: int = 0
    """Lines before row 1 (a TSV header); errors then also give the line number."""

    def where(self, n: int) -> str:
        line = f" (line {n + self.header_lines})" if self.header_lines else ""
        return f"{self.source} row {n}{line}"

    def get(self, n: int, row: dict[str, Any], key: str, kind: type | tuple = str) -> Any:
        """``row[key]``, or a UserError naming the file, the row and the field."""
        if key not in row or row[key] is None:
            have = ", ".join(sorted(map(str, row))) or "nothing"
            raise UserError(f"{self.where(n)}: missing field '{key}' (the row has: {have})")
        value = row[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise UserError(f"{self.where(n)}: field '{key}' is {type(value).__name__} "
                            f"{_short(value)}; expected {_kind_name(kind)}")
        return value

    def nonempty(self) -> Rows:
        if not self.items:
            raise UserError(f"{self.source}: the dataset is empty (no rows); check the path")
        return self

    def head(self, limit: int | None) -> Rows:
        return self if limit is None else Rows(self.source, self.items[:limit], self.header_lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def looks_local(path: str) -> bool:
    """True for an existing path or something written as a file path (not an owner/name hub id:
    that has at most one '/')."""
    return (Path(path).expanduser().exists() or path.startswith(("/", "./", "../", "~", "."))
            or path.lower().endswith(LOCAL_EXTS) or path.count("/") > 1 or "\\" in path)


def listing(names: list[str], first: int = 5) -> str:
    """``a, b, c and 4 more``: a long list shortened for a message."""
    shown = ", ".join(names[:first])
    return f"{shown} and {len(names) - first} more" if len(names) > first else shown or "nothing"


def check_file(path: Path, what: str = "data file") -> None:
    """UserError unless ``path`` is an existing file: missing, or a directory, said so."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir())
        raise UserError(f"{what} {str(path)!r} is a directory; give a file ({' '.join(LOCAL_EXTS)}"
                        f") inside it (it holds: {listing(inside)})")
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")


def read_text(path: Path) -> str:
    """A text file's contents; one that is not UTF-8, or is binary, is named with its line."""
    data = path.read_bytes()
    try:
        text, bad = data.decode("utf-8-sig"), None  # a leading byte-order mark is dropped
    except UnicodeDecodeError as exc:
        text, bad = "", exc.start
    nul = data.find(b"\x00")
    if bad is None and nul < 0:
        return text
    at = min(x for x in (bad, nul) if x is not None and x >= 0)
    line = data[:at].count(b"\n") + 1
    if nul >= 0:
        raise UserError(f"{path} line {line}: binary data (NUL bytes), not UTF-8 text; check the "
                        "path (recipes, jsonl, json and tsv files are text)")
    column = at - (data.rfind(b"\n", 0, at) + 1) + 1
    raise UserError(f"{path} line {line}: not UTF-8 text (byte 0x{data[at]:02x} at column "
                    f"{column}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in > out)")


def read_local(path: Path) -> Rows:
    """Rows of a .jsonl, .json (a list of objects) or .parquet file."""
    check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise UserError(f"data file {str(path)!r}: unsupported extension {suffix!r}; "
                        "use .jsonl, .json or .parquet")
    log.info("read %d rows from %s", len(rows.items), path)
    return rows


def _read_parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: could not be read as parquet ({first_line(exc)}); the file "
                        "is corrupt, truncated or not parquet: write or download it again, or "
                        "give a .jsonl/.json file") from None
    return Rows(str(path), list(enumerate(table.to_pylist(), start=1)))


def _read_jsonl(path: Path) -> Rows:
    rows = Rows(str(path))
    for n, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} row {n}: not valid JSON ({exc.msg} at column "
                            f"{exc.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} row {n}: expected a JSON object, got "
                            f"{type(obj).__name__}")
        rows.items.append((n, obj))
    return rows


def _read_json(path: Path) -> Rows:
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    rows = Rows(str(path))
    for n, row in enumerate(obj, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path} row {n}: expected a JSON object, got {type(row).__name__}")
        rows.items.append((n, row))
    return rows


def read_hub(name: str, config: str | None, split: str) -> Rows:
    """One split of a hub dataset via ``datasets.load_dataset``."""
    import datasets

    label = f"{name}" + (f" ({config})" if config else "") + f" split '{split}'"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError) as exc:  # ConnectionError, DatasetNotFoundError, bad split name
        raise UserError(f"data.path: cannot load hub dataset {label}: {first_line(exc)}. There "
                        f"is no local file or directory {name!r} here either: for local data give "
                        "its path (./x.jsonl or /abs/dir); offline, HF_HUB_OFFLINE=1 skips the "
                        "network retries") from None
    log.info("loaded %d rows from hub dataset %s", len(ds), label)
    return Rows(f"hub:{name}[{split}]", list(enumerate(ds.to_list(), start=1)))


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line, cut to ``limit`` characters (for a one-line message)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()),
                type(exc).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def find_in_dir(directory: Path, names: tuple[str, ...],
                exts: tuple[str, ...] = (".jsonl", ".json", ".parquet")) -> Path | None:
    """The first ``<name><ext>`` that exists in ``directory``."""
    for name in names:
        for ext in exts:
            if (directory / f"{name}{ext}").is_file():
                return directory / f"{name}{ext}"
    return None


def load_splits(path: str, eval_path: str | None, config: str | None, eval_split: str | None,
                reader=read_local, eval_names: tuple[str, ...] = EVAL_NAMES
                ) -> tuple[Rows, Rows | None]:
    """Train rows and (if found) eval rows for a hub id, a local directory or a local file.

    Local directory: ``train.*`` and the first of ``eval_names`` (``test.* / validation.* /
    dev.*``). Local file: it is the train split; eval is ``data.eval_path`` or, for a file
    named ``train.<ext>``, a sibling named like ``test.<ext>``. Hub id: split ``train`` and
    ``data.eval_path`` (a split name or a local file), else ``eval_split`` (None: none).
    """
    if not path:
        raise UserError("data.path is empty: give a hub dataset id or a local file/directory")
    eval_rows = None
    if eval_path is not None and looks_local(eval_path):
        eval_rows = reader(Path(eval_path).expanduser())
    if not looks_local(path):
        train = read_hub(path, config, "train")
        if eval_rows is None and (eval_path or eval_split):
            eval_rows = read_hub(path, config, eval_path or eval_split)
        return train, eval_rows
    local = Path(path).expanduser()
    if local.is_dir():
        train_file = find_in_dir(local, ("train",))
        if train_file is None:
            inside = sorted(p.name for p in local.iterdir())
            raise UserError(f"data.path: directory {path!r} has no train.jsonl, train.json or "
                            f"train.parquet (it holds: {listing(inside)}); give the training file "
                            "itself as data.path, or rename it train.<ext>")
        eval_file = find_in_dir(local, eval_names)
    else:
        train_file = local
        eval_file = find_in_dir(local.parent, eval_names, (local.suffix,)) if (
            local.stem == "train") else None
    train = reader(train_file)
    if eval_rows is None and eval_path is not None:
        raise UserError(f"data.eval_path {eval_path!r}: not a file (a split name only works "
                        "with a hub dataset id)")
    if eval_rows is None and eval_file is not None:
        eval_rows = reader(eval_file)
    return train, eval_rows
