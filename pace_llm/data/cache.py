"""The task cache: tokenize a task once, store it as Arrow, share it by memory map.

:func:`build` turns a task's :class:`~pace_llm.data.spec.TaskSpec` into TaskData. The
training examples are stored under ``<cache>/tasks/<task>-<key>/`` (``data.cache_dir``, else
``$PACE_LLM_CACHE``, else ``~/.cache/pace_llm``); the key is a SHA-256 over everything the
tokens depend on (:func:`cache_key`). Rank 0 builds: validated rows are streamed into an Arrow
file and tokenized by ``Dataset.map`` in ``data.num_proc`` processes (the spec's own row ->
example functions), whose output files are the cache, in a temporary directory renamed into
place when complete. The other ranks wait at a barrier and memory-map the same files: N ranks
tokenize once and hold no copy. A start whose key exists loads it ("task cache hit") and
replays the build's log lines. Evaluation rows (small) are stored as JSON beside them.

Every entry ends with ``MANIFEST.json`` (each file's size and SHA-256), written last; a start
reads an entry only after every file matches it, and builds an entry that does not again
(logged). Its :func:`identity` goes into every checkpoint, so a resume notices changed data.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pace_llm import distributed as D
from pace_llm.data.examples import ArrowExamples, TaskData
from pace_llm.data.files import data_files, file_sha256
from pace_llm.data.length import LengthPolicy
from pace_llm.data.spec import TaskSpec
from pace_llm.errors import UserError

log = logging.getLogger(__name__)

MIN_ROWS_PER_PROC = 2000
"""Fewer rows than this per process: tokenize in fewer processes (a pool costs ~1 s)."""
PROGRESS_ROWS = 20000  # datasets' progress bars from this many training rows on
BATCH = 5000  # rows per map batch and per Arrow record batch (each costs ~128 KB of
# readahead when the file is opened: few and large)
WAIT_HOURS = 24  # how long the other ranks wait for rank 0's build
OUTCOME = ("length", "supervised", "truncated")  # per kept example, beside its columns
PROBE = "Hello world!\n\n  Naïve café, 123 + 4.5 = ?\t<s></s> ### User:\n"
TOKENIZER_SETTINGS = ("truncation_side", "add_bos_token", "add_eos_token", "add_prefix_space",
                      "clean_up_tokenization_spaces", "legacy", "do_lower_case")
DATA_DIR = Path(__file__).resolve().parent
TASKS_DIR = DATA_DIR.parent / "tasks"
KEYED_CODE = ("sources.py", "tokens.py", "templates.py", "length.py", "examples.py", "cache.py")
"""The data modules (besides pace_llm/tasks) whose code decides what a task's cache holds."""
KEY_FIELDS = ("task", "path", "eval_path", "hub_config", "max_length", "on_too_long",
              "prompt_style", "chat_template", "limit", "glue_task", "num_examples", "seed",
              "columns")


# ------------------------------------------------------------------------------ the key

def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def code_version() -> str:
    """SHA-256 of the code that decides a cached task's content: every task definition
    (pace_llm/tasks/*.py) and the data modules that read and check rows, tokenize them, cut them
    to length and store them (:data:`KEYED_CODE`). A change to any of them is a new key."""
    files = sorted(TASKS_DIR.glob("*.py")) + [DATA_DIR / name for name in KEYED_CODE]
    return _sha(b"".join(f"{p.parent.name}/{p.name}".encode() + b"\0" + p.read_bytes()
                         for p in files))


def tokenizer_fingerprint(tok: Any) -> dict[str, Any]:
    """What the tokenizer's ids depend on: its model, special and added tokens, chat template,
    settings, and the ids of a probe text (so a changed setting cannot go unnoticed)."""
    backend = getattr(tok, "backend_tokenizer", None)
    parts: dict[str, Any] = {"class": type(tok).__qualname__}
    if backend is not None:
        parts["backend"] = _sha(backend.to_str())
    else:
        parts["vocab"] = _sha(json.dumps(sorted(tok.get_vocab().items())))
        sp = getattr(tok, "sp_model", None)
        parts["sp_model"] = _sha(sp.serialized_model_proto()) if sp is not None else None
    parts["special"] = {k: str(v) for k, v in tok.special_tokens_map.items()}
    parts["added"] = {str(i): repr(t) for i, t in sorted(tok.added_tokens_decoder.items())}
    parts["chat_template"] = tok.chat_template
    settings = {}
    for name in TOKENIZER_SETTINGS:
        try:
            settings[name] = repr(getattr(tok, name, None))
        except Exception:  # noqa: BLE001 - a property that cannot answer is no setting
            settings[name] = None
    parts["settings"] = settings
    parts["probe"] = [list(tok(PROBE, add_special_tokens=s)["input_ids"]) for s in (True, False)]
    return parts


def cache_key(spec: TaskSpec, data: Any, tok: Any) -> tuple[str, dict[str, Any]]:
    """(SHA-256 hex, the material it is computed over)."""
    import jinja2
    import tokenizers
    import transformers

    material = {
        "code": code_version(),
        "versions": {"transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "jinja2": jinja2.__version__},
        "data": {k: getattr(data, k, None) for k in KEY_FIELDS},
        "files": {} if data.task == "synthetic" else data_files((data.path, data.eval_path)),
        "tokenizer": tokenizer_fingerprint(tok),
        "task": spec.key,
    }
    return _sha(json.dumps(material, sort_keys=True, default=repr)), material


def cache_root(data: Any) -> Path:
    """data.cache_dir, else $PACE_LLM_CACHE, else ~/.cache/pace_llm."""
    given = getattr(data, "cache_dir", None) or os.environ.get("PACE_LLM_CACHE")
    return Path(given or "~/.cache/pace_llm").expanduser().absolute()


def task_dir(spec: TaskSpec, data: Any, key: str) -> Path:
    return cache_root(data) / "tasks" / f"{spec.name.replace('/', '-')}-{key[:32]}"


def num_proc(data: Any) -> int:
    """data.num_proc, or min(8, the CPUs this process may use)."""
    given = getattr(data, "num_proc", None)
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
        raise UserError(f"data.num_proc: {given!r} must be an integer >= 1 (or null: automatic)")
    return given or min(8, len(os.sched_getaffinity(0)))


# ------------------------------------------------------------------------------ build & load

def _map_batch(batch: dict[str, list], indices: list[int], *, train_fn: Callable, tok: Any,
               ctx: Any, policy_args: tuple, columns: tuple[str, ...], notes: str,
               state: dict) -> dict[str, list]:
    """Tokenize one batch of records: the kept examples with their outcome columns. What the
    rows do not carry (the dropped ones, a UserError, the largest id) is noted, by the batch's
    first row index, in a per-process file under ``notes``. After an error the rest of this
    shard is skipped: the build fails with the first error anyway."""
    out: dict[str, list] = {c: [] for c in (*columns, *OUTCOME)}
    if state.get("failed"):
        return out
    policy = LengthPolicy(*policy_args, record=True)
    note: dict[str, Any] = {"first": indices[0]}
    try:
        examples = train_fn(tok, ctx, [dict(zip(batch, v)) for v in zip(*batch.values())],
                            policy)
    except UserError as exc:
        state["failed"], note["error"] = True, str(exc)
        examples = []
    lost = [event[3] for event in policy.events if event[3] >= 0]
    for example, (n, supervised, cut, _) in zip(examples, policy.events):
        if example is not None:
            for c in columns:
                out[c].append(example[c])
            for c, value in zip(OUTCOME, (n, supervised, cut)):
                out[c].append(value)
    note.update(dropped=len(lost), shortest=min(lost, default=None),
                max_id=max((max(ids, default=-1) for ids in out["input_ids"]), default=-1))
    with open(Path(notes, f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(note) + "\n")
    return out


def _write_records(records: Iterable[dict], columns: dict[str, str], path: Path) -> int:
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(),
             "messages": pa.list_(message)}
    schema = pa.schema([(name, types[kind]) for name, kind in columns.items()])
    n, batch = 0, []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for record in records:
            batch.append(record)
            n += 1
            if len(batch) == BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
    return n


def _tokenize(spec: TaskSpec, data: Any, tok: Any, raw: Any, source: str, out: Path,
              notes: Path) -> dict[str, int]:
    """Map the raw records to the kept examples, written straight into ``out`` (one Arrow file
    per process, never copied); their statistics (and the largest id, as ``max_id``)."""
    import datasets
    import pyarrow.compute as pc

    ids = datasets.List(datasets.Value("int32"))
    features = datasets.Features({
        "input_ids": ids, **({"labels": ids} if spec.kind == "causal_lm"
                             else {"label": datasets.Value(spec.label_dtype)}),
        "length": datasets.Value("int32"), "supervised": datasets.Value("int32"),
        "truncated": datasets.Value("bool")})
    procs = min(num_proc(data), max(1, len(raw) // MIN_ROWS_PER_PROC))
    fn = partial(_map_batch, train_fn=spec.train_fn, tok=tok, ctx=spec.ctx,
                 policy_args=(data.max_length, data.on_too_long, source), columns=spec.columns,
                 notes=str(notes), state={})
    out.mkdir()
    done = raw.map(fn, with_indices=True, batched=True, batch_size=BATCH,
                   writer_batch_size=BATCH, remove_columns=raw.column_names, features=features,
                   num_proc=procs if procs > 1 else None, new_fingerprint="tokenized",
                   cache_file_name=str(out / "data.arrow"), desc=f"tokenizing {spec.name}")
    batches = [json.loads(line) for f in notes.glob("*.jsonl")
               for line in f.read_text().splitlines()]
    errors = sorted((b["first"], b["error"]) for b in batches if "error" in b)
    if errors:
        raise UserError(errors[0][1])
    # only these small columns are read (memory-mapped pages), never the token ids
    total = [pc.sum(done.data.column(c)).as_py() or 0 for c in OUTCOME]
    lost = [b["shortest"] for b in batches if b["dropped"]]
    stats = LengthPolicy.from_outcomes(
        data.max_length, data.on_too_long, source, len(done), *map(int, total),
        sum(b["dropped"] for b in batches), min(lost, default=None)).finish()
    return {**stats, "max_id": max((b["max_id"] for b in batches), default=-1)}


def _build_into(spec: TaskSpec, data: Any, tok: Any, out: Path, material: dict,
                logs: list) -> None:
    """Read, tokenize and save the task into the (new) directory ``out``; meta.json last."""
    import datasets

    work = out / "work"
    (work / "notes").mkdir(parents=True)
    splits = spec.read()
    n = _write_records(splits.train, spec.schema, work / "records.arrow")
    raw = datasets.Dataset.from_file(str(work / "records.arrow"))
    eval_records = None
    end = n
    if splits.eval is None:
        end = n - splits.holdout(n)
        eval_records = raw.select(range(end, n)).to_list()
    if splits.limit is not None:
        end = min(end, splits.limit)
    with _progress_bars(end >= PROGRESS_ROWS):
        stats = _tokenize(spec, data, tok, raw.select(range(end)), splits.source, out / "train",
                          work / "notes")
    max_id = stats.pop("max_id")
    evals = spec.eval_fn(tok, spec.ctx, eval_records if eval_records is not None
                         else splits.eval())
    extra = {name: spec.eval_fn(tok, spec.ctx, read()) for name, read in splits.extra.items()}
    (out / "eval.json").write_text(json.dumps({"eval": evals, "extra": extra}))
    (out / "key.json").write_text(json.dumps(material, indent=1, sort_keys=True, default=repr))
    del raw
    shutil.rmtree(work)
    (out / "meta.json").write_text(json.dumps({"stats": stats, "max_id": max_id, "logs": logs}))
    _write_manifest(out)


# ------------------------------------------------------------------------------ verification
MANIFEST = "MANIFEST.json"
"""Every file of an entry with its size and SHA-256, written last by the builder."""


def _entry_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.name != MANIFEST and not p.is_dir())


def _write_manifest(directory: Path) -> None:
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _entry_files(directory)}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_entry(directory: Path) -> str | None:
    """None if the entry holds exactly the files of its manifest, each of its size and SHA-256
    (none a symbolic link); else what is wrong. Every byte is read: about 1 s per GB."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MANIFEST} is unreadable ({exc})"
    present = {str(p.relative_to(directory)): p for p in _entry_files(directory)}
    for rel, path in present.items():
        if path.is_symlink() or not path.is_file():
            return f"{rel} is not a regular file"
    if set(present) != set(files):
        odd = sorted(set(present) ^ set(files))[0]
        return f"{odd} is {'not in' if odd in present else 'missing from the entry but in'} " \
               f"its {MANIFEST}"
    for rel, meta in files.items():
        if not isinstance(meta, dict) or present[rel].stat().st_size != meta.get("size"):
            return f"{rel} has another size than its {MANIFEST} records (truncated or changed)"
        if file_sha256(present[rel]) != meta.get("sha256"):
            return f"{rel} does not match its SHA-256 in {MANIFEST} (the file was changed)"
    return None


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """datasets' progress bars (map) only for a large set."""
    import datasets

    off = not show and datasets.utils.logging.is_progress_bar_enabled()
    if off:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if off:
            datasets.enable_progress_bars()


CAPTURED = ("pace_llm.data", "pace_llm.tasks")
"""The loggers whose lines during a build are replayed on a cache hit (readers, templates)."""


class _Capture(logging.Handler):
    """The data and task modules' log lines during a build, to replay on a cache hit."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != __name__:
            self.lines.append((record.name, record.levelno, record.getMessage()))


def _complete(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()  # written last


def _make(spec: TaskSpec, data: Any, tok: Any, directory: Path, material: dict) -> bool:
    """Build ``directory`` unless it is complete and verifies (:func:`verify_entry`); an entry
    that does not is named and built again. True if this call built it."""
    complete = _complete(directory)
    problem = verify_entry(directory) if complete else None
    if complete and problem is None:
        return False
    if problem is not None:
        log.warning("warning: task cache: %s does not verify (%s); building it again",
                    directory, problem)
    host = socket.gethostname()
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{directory.name}.tmp-{host}-*"):  # left by a killed build
            if not Path("/proc", stale.name.rsplit("-", 1)[1]).exists():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".{directory.name}.tmp-{host}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise _unwritable(parent, exc) from None
    capture, started = _Capture(), time.perf_counter()
    for name in CAPTURED:
        logging.getLogger(name).addHandler(capture)
    try:
        _build_into(spec, data, tok, tmp, material, capture.lines)
        if directory.exists() and (problem is not None or not _complete(directory)):
            shutil.rmtree(directory)  # an incomplete or changed directory is no cache
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same key first: use theirs
            if not _complete(directory):
                raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise _unwritable(parent, exc) from None
        raise
    finally:
        for name in CAPTURED:
            logging.getLogger(name).removeHandler(capture)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("task cache: built %s in %.1f s", directory, time.perf_counter() - started)
    return True


def _unwritable(where: Path, exc: OSError) -> UserError:
    return UserError(f"task cache: cannot write {where} ({exc.strerror or exc}); free space, or "
                     "set data.cache_dir (or $PACE_LLM_CACHE) to a writable directory")


def load(spec: TaskSpec, directory: Path, replay: bool) -> TaskData:
    """TaskData from a complete cache directory (training examples memory-mapped)."""
    import datasets

    try:
        meta = json.loads((directory / "meta.json").read_text())
        evals = json.loads((directory / "eval.json").read_text())
        shards = sorted((directory / "train").glob("*.arrow"))
        train = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p))
                                               for p in shards])
    except (OSError, ValueError) as exc:
        raise UserError(f"task cache {directory} is unreadable ({exc}); delete that directory "
                        "and start again") from None
    if replay:
        for name, level, message in meta["logs"]:
            logging.getLogger(name).log(level, "%s", message)
    return spec.task(ArrowExamples(train, spec.columns, meta["max_id"]), evals["eval"],
                     meta["stats"], evals["extra"])


def _wait_group() -> Any:
    """A gloo group over every rank whose collectives wait up to WAIT_HOURS: while rank 0
    builds, the others wait longer than the default group's timeout (DeepSpeed: 10 minutes)
    allows. None without a process group (or with one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=WAIT_HOURS))


def build(spec: TaskSpec, data: Any, tok: Any) -> TaskData:
    """The task through the cache: rank 0 builds it unless its key exists while the other ranks
    wait, then every rank memory-maps it; a node that cannot see rank 0's directory (a local
    disk) builds its own copy. Every rank has made the spec (its checks, the tokenizer's chat
    template). Without a process group this is one process doing both."""
    group = _wait_group()
    mine = cache_key(spec, data, tok) if D.is_main() else None
    key, material = D.all_gather_objects(mine, group)[0]
    directory = task_dir(spec, data, key)
    built = False

    def attempt() -> str | None:
        nonlocal built
        try:
            built = _make(spec, data, tok, directory, material)
        except UserError as exc:
            return str(exc)
        return None

    try:
        errors = D.all_gather_objects(attempt() if D.is_main() else None, group)
        if group is not None and not errors[0]:
            local = D.local_rank() == 0 and not _complete(directory)
            errors = D.all_gather_objects(attempt() if local else None, group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    if any(errors):
        raise UserError(next(e for e in errors if e))
    if D.is_main() and not built:
        log.info("task cache hit: %s", directory)
    task = load(spec, directory, replay=not built)
    task.identity = identity(key, material)
    return task


def identity(key: str, material: dict[str, Any]) -> dict[str, Any]:
    """What identifies cached data in a checkpoint: the cache key, every data file's SHA-256,
    and a hash of each other part of the key (pace_llm/data/files.py compares them)."""
    parts = {k: _sha(json.dumps(material[k], sort_keys=True, default=repr))
             for k in ("code", "versions", "tokenizer", "task", "data")}
    return {"kind": "cache", "key": key, "files": material["files"], "parts": parts}
