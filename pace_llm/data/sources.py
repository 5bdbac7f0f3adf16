"""Task rows from local files (jsonl, json, parquet, csv, tsv) or the Hugging Face hub.

Every row keeps its 1-based number so that an error can name the file and the row. In a
jsonl file the row number is the line number; in a CSV or headered TSV it is the data row,
and the message adds the line (``row 5 (line 6)``). Rows of all but .json files are streamed:
read as they are used, never all held at once."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from pace_llm.errors import UserError, check_text, first_line, listing, read_text
from pace_llm.hub import OFFLINE_FORM

log = logging.getLogger(__name__)

LOCAL_EXTS = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
EVAL_NAMES = ("test", "validation", "dev")
CSV_FIELD_LIMIT = 64 * 2**20  # characters in one CSV field (the csv module's default is 128 K)

Item = tuple[int, dict[str, Any]]

SYNONYMS: dict[str, tuple[str, ...]] = {
    "question": ("question", "query", "prompt", "problem", "input", "instruction"),
    "answer": ("answer", "response", "output", "completion", "solution", "target", "reply"),
    "instruction": ("instruction", "prompt", "question", "query", "problem", "input"),
    "output": ("output", "response", "completion", "answer", "solution", "target", "reply"),
}
"""Field names that commonly hold a task field's text, most likely first (a hint only)."""


def columns_hint(row: dict[str, Any], fields: tuple[str, ...]) -> str:
    """``; map them with --data.columns '{question: prompt, answer: response}'`` when each task
    field the row lacks has a likely field in the row (:data:`SYNONYMS`), else ""."""
    have = [k for k in row if isinstance(k, str) and k not in fields]
    mapping: dict[str, str] = {}
    for name in (f for f in fields if f not in row):
        likely = [k for k in have if k.lower() in SYNONYMS.get(name, ())
                  and k not in mapping.values()]
        if not likely:
            return ""
        mapping[name] = min(likely, key=lambda k: SYNONYMS[name].index(k.lower()))
    if not mapping:
        return ""
    pairs = ", ".join(f"{task}: {mine}" for task, mine in mapping.items())
    return f"; if they hold the task's fields, map them with --data.columns '{{{pairs}}}'"


class Rows:
    """Rows of one split as (row number, row dict) pairs; ``source`` names it.

    Either ``items`` (a list) or ``stream`` (a function returning a fresh iterator of pairs,
    read as it is used). ``items`` on streamed rows reads them all into a list.
    """

    def __init__(self, source: str, items: list[Item] | None = None, header_lines: int = 0,
                 stream: Callable[[], Iterator[Item]] | None = None,
                 lines: dict[int, int] | None = None):
        self.source = source
        self._items = items if items is not None or stream is not None else []
        self._stream = stream
        self.header_lines = header_lines
        """Lines before row 1 (a header); errors then also give the line number."""
        self.lines = {} if lines is None else lines
        """Rows whose line is not ``n + header_lines`` (blank lines, multi-line CSV fields)."""

    @property
    def items(self) -> list[Item]:
        if self._items is None:
            self._items = list(self._stream())
        return self._items

    def __iter__(self) -> Iterator[Item]:
        return iter(self._items) if self._items is not None else self._stream()

    def where(self, n: int) -> str:
        line = self.lines.get(n, n + self.header_lines)
        return f"{self.source} row {n}" + (f" (line {line})" if self.header_lines else "")

    def get(self, n: int, row: dict[str, Any], key: str, kind: type | tuple = str,
            fields: tuple[str, ...] = ()) -> Any:
        """``row[key]``, or a UserError naming the file, the row and the field (and, given the
        task's ``fields``, the data.columns mapping that would fit the row's own names)."""
        if key not in row or row[key] is None:
            have = ", ".join(sorted(map(str, row))) or "nothing"
            raise UserError(f"{self.where(n)}: missing field '{key}' (the row has: {have})"
                            + columns_hint(row, fields or (key,)))
        value = row[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise UserError(f"{self.where(n)}: field '{key}' is {type(value).__name__} "
                            f"{_short(value)}; expected {_kind_name(kind)}")
        return value

    def _like(self, **kw: Any) -> Rows:
        return Rows(self.source, header_lines=self.header_lines, lines=self.lines, **kw)

    def nonempty(self) -> Rows:
        """These rows; a UserError when there are none (for streamed rows: once read)."""
        if self._items is not None:
            if not self._items:
                raise UserError(f"{self.source}: the dataset is empty (no rows); check the path")
            return self

        def stream() -> Iterator[Item]:
            empty = True
            for item in self._stream():
                empty = False
                yield item
            if empty:
                raise UserError(f"{self.source}: the dataset is empty (no rows); check the path")
        return self._like(stream=stream)

    def renamed(self, columns: dict[str, str] | None) -> Rows:
        """These rows with fields renamed to the task's (``data.columns``: {task field: data
        field}); a row without a mapped field is named with the mapping."""
        if not columns:
            return self

        def rename(n: int, row: dict[str, Any]) -> dict[str, Any]:
            out = {k: v for k, v in row.items() if k not in columns.values()}
            for task_field, field in columns.items():
                if field not in row:
                    have = ", ".join(sorted(map(str, row))) or "nothing"
                    raise UserError(f"{self.where(n)}: missing field '{field}' (data.columns maps "
                                    f"it to the task's '{task_field}'; the row has: {have})")
                out[task_field] = row[field]
            return out

        return self._like(stream=lambda: ((n, rename(n, row)) for n, row in self))

    def head(self, limit: int | None) -> Rows:
        if limit is None:
            return self
        if self._items is not None:
            return self._like(items=self._items[:limit])
        return self._like(stream=lambda: islice(self._stream(), limit))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def looks_like_path(value: str, suffixes: tuple[str, ...] = ()) -> bool:
    """True when ``value`` is (or is written as) a filesystem path rather than a hub id, which
    is ``name`` or ``owner/name``: it starts with ``/``, ``.`` or ``~``, has two or more ``/``
    or a ``\\``, ends with one of ``suffixes`` (any case; the data readers pass
    :data:`LOCAL_EXTS`), or exists. The one test for model names, data paths and template files.
    """
    return (value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value
            or value.lower().endswith(suffixes) or Path(value).expanduser().exists())


def check_file(path: Path, what: str = "data file") -> None:
    """UserError unless ``path`` is an existing file: missing, or a directory, said so."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir())
        raise UserError(f"{what} {str(path)!r} is a directory; give a file ({' '.join(LOCAL_EXTS)}"
                        f") inside it (it holds: {listing(inside)})")
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")


def read_local(path: Path) -> Rows:
    """Rows of a .jsonl, .json (a list of objects), .parquet, or headered .csv / .tsv file."""
    check_file(path)
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
               ".csv": _read_csv, ".tsv": _read_csv}
    if suffix not in readers:
        raise UserError(f"data file {str(path)!r}: unsupported extension {suffix!r}; "
                        "use .jsonl, .json, .parquet, .csv or .tsv")
    rows = readers[suffix](path)
    if rows._items is not None:
        log.info("read %d rows from %s", len(rows.items), path)
    return rows


def _counted(path: Path, items: Iterator[Item]) -> Iterator[Item]:
    count = 0
    for count, item in enumerate(items, start=1):
        yield item
    log.info("read %d rows from %s", count, path)


def _read_parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def stream(rows: bool = True) -> Iterator[Item]:
        try:
            with pq.ParquetFile(path) as f:  # the footer: most damage shows here
                batches = f.iter_batches(batch_size=4096) if rows else ()
                yield from enumerate((r for b in batches for r in b.to_pylist()), start=1)
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: could not be read as parquet ({first_line(exc)}); the "
                            "file is corrupt, truncated or not parquet: write or download it "
                            "again, or give a .jsonl/.json file") from None
    list(stream(rows=False))  # now, before any row
    return Rows(str(path), stream=lambda: _counted(path, stream()))


def _read_jsonl(path: Path) -> Rows:
    check_text(path)

    def stream() -> Iterator[Item]:
        with path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                line = raw.decode("utf-8")
                if n == 1:
                    line = line.removeprefix("\ufeff")
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
                yield n, obj
    return Rows(str(path), stream=lambda: _counted(path, stream()))


def _read_csv(path: Path) -> Rows:
    """A CSV (or TSV) file whose first record is the header; fields may be quoted."""
    check_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    kind = "TSV" if delimiter == "\t" else "CSV"

    def stream() -> Iterator[Item]:
        csv.field_size_limit(CSV_FIELD_LIMIT)
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header, n, start = None, 0, 1
            while True:
                try:
                    fields = next(reader, None)
                except csv.Error as exc:
                    raise UserError(f"{path} line {start}: malformed {kind} ({exc}); a field that "
                                    "opens a quote (\") must close it, and a quote inside a "
                                    "quoted field is doubled (\"\")") from None
                if fields is None:
                    break
                line, start = start, reader.line_num + 1
                if not any(fields):
                    continue  # a blank line
                if header is None:
                    header = _header(path, line, [h.strip() for h in fields])
                    continue
                n += 1
                if line != n + 1:
                    rows.lines[n] = line
                if len(fields) != len(header):
                    raise UserError(f"{rows.where(n)}: {len(fields)} fields, expected "
                                    f"{len(header)} (the header has: {', '.join(header)})")
                yield n, dict(zip(header, fields))
            if header is None:
                raise UserError(f"{path}: the dataset is empty (no header row); a {kind} file "
                                "starts with a header naming its columns")
    rows = Rows(str(path), header_lines=1, stream=lambda: _counted(path, stream()))
    return rows


def _header(path: Path, line: int, names: list[str]) -> list[str]:
    """A CSV/TSV header whose column names are distinct (a repeated name would let its last
    column's values replace the first's in every row)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if name in seen:
            raise UserError(f"{path} line {line}: the header names column {name!r} twice "
                            f"(columns {seen[name]} and {i}); rename or remove one of them")
        seen[name] = i
    return names


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


def read_hub(name: str, config: str | None, split: str, streaming: bool = False) -> Rows:
    """One split of a hub dataset via ``datasets.load_dataset`` (memory-mapped, or with
    ``streaming`` read over the network as iterated: nothing downloaded first)."""
    import datasets

    label = f"{name}" + (f" ({config})" if config else "") + f" split '{split}'"
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except (OSError, ValueError) as exc:  # ConnectionError, DatasetNotFoundError, bad split name
        raise UserError(f"data.path: cannot load hub dataset {label}: {first_line(exc)}. There "
                        f"is no local file or directory {name!r} here either: for local data give "
                        f"its path (./x.jsonl or /abs/dir); {OFFLINE_FORM}") from None
    if streaming:
        log.info("streaming hub dataset %s", label)
    else:
        log.info("loaded %d rows from hub dataset %s", len(ds), label)
    return Rows(f"hub:{name}[{split}]", stream=lambda: enumerate(ds, start=1))


def find_in_dir(directory: Path, names: tuple[str, ...],
                exts: tuple[str, ...] = LOCAL_EXTS) -> Path | None:
    """The first ``<name><ext>`` that exists in ``directory``."""
    for name in names:
        for ext in exts:
            if (directory / f"{name}{ext}").is_file():
                return directory / f"{name}{ext}"
    return None


def eval_sibling(train_file: Path, names: tuple[str, ...] = EVAL_NAMES) -> Path | None:
    """The evaluation file beside a ``train.<ext>`` file: ``test``/``validation``/``dev`` with
    the same extension first, else with any data extension (a test.jsonl beside a train.csv)."""
    if train_file.stem != "train":
        return None
    return (find_in_dir(train_file.parent, names, (train_file.suffix,))
            or find_in_dir(train_file.parent, names))


def load_splits(path: str, eval_path: str | None, config: str | None, eval_split: str | None,
                reader=read_local, eval_names: tuple[str, ...] = EVAL_NAMES,
                columns: dict[str, str] | None = None, streaming: bool = False
                ) -> tuple[Rows, Rows | None]:
    """Train rows and (if found) eval rows, fields renamed by ``columns`` (``data.columns``)."""
    train, evals = _load_splits(path, eval_path, config, eval_split, reader, eval_names,
                                streaming)
    return train.renamed(columns), evals.renamed(columns) if evals is not None else None


def _load_splits(path: str, eval_path: str | None, config: str | None, eval_split: str | None,
                 reader, eval_names: tuple[str, ...], streaming: bool
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
    if eval_path is not None and looks_like_path(eval_path, LOCAL_EXTS):
        eval_rows = reader(Path(eval_path).expanduser())
    if not looks_like_path(path, LOCAL_EXTS):
        train = read_hub(path, config, "train", streaming)
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
        eval_file = eval_sibling(local, eval_names)
    train = reader(train_file)
    if eval_rows is None and eval_path is not None:
        raise UserError(f"data.eval_path {eval_path!r}: not a file (a split name only works "
                        "with a hub dataset id)")
    if eval_rows is None and eval_file is not None:
        eval_rows = reader(eval_file)
    return train, eval_rows
