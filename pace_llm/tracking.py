"""Experiment tracking (``train.report_to``): every metrics.jsonl record also goes to
TensorBoard, Weights & Biases and/or MLflow, with the resolved recipe as the run's config.

Only rank 0 constructs a :class:`Tracker` (the caller's job). Each backend is an optional extra
(``pip install 'pace-llm[wandb]'``; ``[track]`` for all three); a missing one is a UserError
naming it. ``<run_dir>/tracking.json`` keeps the run ids, so a resumed run continues the same
W&B run, MLflow run and TensorBoard directory (``<run_dir>/tensorboard``, where the first record
after a resume purges the events at and after its step that a crashed run left behind).

Names: ``train/<key>``, ``eval/<key>`` (nested dicts joined by ``/``: ``eval/metrics/exact_match``,
``eval/extra/mismatched/accuracy``); booleans count as 0/1; nulls, strings and lists are skipped;
sample generations are text (TensorBoard ``eval/samples``, a W&B table ``eval/samples``, MLflow
artifacts ``eval_samples/step-NNNNNNN.md``). W&B honours WANDB_MODE, WANDB_PROJECT (default
"pace-llm"), WANDB_ENTITY, WANDB_NAME; its files go under ``<run_dir>/wandb``. MLflow honours
MLFLOW_TRACKING_URI (default: a file store at ``<run_dir>/mlruns``) and MLFLOW_EXPERIMENT_NAME
(default "pace-llm"); params are the flattened recipe (``section.key``, values cut to 500
characters). A backend failing to log or close is a warning, named once; one that cannot write
in the run folder (read-only, full, no permission), a warning, and the run goes on without it;
one that cannot start otherwise (not installed, not logged in), a UserError.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import re
import textwrap
import time
from pathlib import Path
from typing import Any

from pace_llm.atomic import atomic_write
from pace_llm.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
TB_DIR = "tensorboard"
DEFAULT_PROJECT = "pace-llm"
MLFLOW_PARAM_MAX = 500  # the value limit of older MLflow servers (newer ones allow more)


# --- records and recipes as flat names

def _scalars(prefix: str, obj: dict[str, Any], out: dict[str, float]) -> None:
    for key, value in obj.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            _scalars(name, value, out)
        elif isinstance(value, (bool, int, float)):  # booleans as 0/1
            out[name] = float(value)


def flatten_record(record: dict[str, Any]) -> tuple[int, dict[str, float], list[dict[str, Any]]]:
    """(step, scalars by tracker name, sample generations) of one metrics.jsonl record."""
    scalars: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    for key, value in record.items():
        if key == "step":
            continue
        if key == "eval" and isinstance(value, dict):
            _scalars("eval", value, scalars)
            samples = [s for s in value.get("samples") or [] if isinstance(s, dict)]
        else:
            _scalars("train", {key: value}, scalars)
    return int(record.get("step", 0)), scalars, samples


def flatten_recipe(recipe: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``section.key`` -> the value as text (lists and dicts as JSON)."""
    out: dict[str, str] = {}
    for key, value in recipe.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:
            out.update(flatten_recipe(value, f"{name}."))
        elif isinstance(value, (dict, list, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = str(value)
    return out


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """The sample generations as Markdown, each text an indented (verbatim) block."""
    parts = []
    for i, sample in enumerate(samples, 1):
        parts.append(f"**sample {i}**")
        for key, value in sample.items():
            body = str(value) if value not in (None, "") else "(empty)"
            parts.append(f"{key}:\n\n" + textwrap.indent(body, "    ", lambda line: True))
    return "\n\n".join(parts) + "\n"


def _recipe_markdown(recipe: dict[str, Any]) -> str:
    import yaml

    text = yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=False)
    return textwrap.indent(text, "    ", lambda line: True)


# --- backends: each has log(step, scalars, samples), close(ok) and state (for tracking.json)

FAULTS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
          errno.EFBIG: "file-size limit", errno.EROFS: "read-only filesystem",
          errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def write_fault(exc: BaseException) -> str | None:
    """What the filesystem refused, if an exception (or one it wraps) is a refused write."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FAULTS:
            return f"{FAULTS[exc.errno]}: {exc.filename or exc}"
        exc = exc.__cause__ or exc.__context__
    return None


class _TensorBoard:
    def __init__(self, run_dir: Path, recipe: dict[str, Any], resumed: bool, saved: dict):
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self.log_dir = run_dir / TB_DIR
        self.recipe = recipe
        self.resumed = resumed
        self.writer = None
        self.state = {"log_dir": TB_DIR}
        if not resumed:  # a resumed run opens its writer at its first record (purge_step)
            self._open(0)

    def _open(self, step: int) -> None:
        self.writer = self._writer_cls(str(self.log_dir),
                                       purge_step=step if self.resumed else None)
        self.writer.add_text("recipe", _recipe_markdown(self.recipe), step)

    def log(self, step: int, scalars: dict[str, float], samples: list[dict]) -> None:
        if self.writer is None:
            self._open(step)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if samples:
            self.writer.add_text("eval/samples", samples_markdown(samples), step)
        self.writer.flush()

    def close(self, ok: bool) -> None:
        if self.writer is not None:
            self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, recipe: dict[str, Any], resumed: bool, saved: dict):
        import wandb

        self.wandb = wandb
        project = saved.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        run_id = saved.get("run_id") or None  # a resumed run keeps its id, project and name
        name = None if run_id else os.environ.get("WANDB_NAME") or run_dir.name
        try:
            self.run = wandb.init(project=project, entity=saved.get("entity") or None,
                                  id=run_id, resume="allow", dir=str(run_dir), name=name,
                                  config=recipe, allow_val_change=True)
        except Exception as exc:
            raise UserError(f"train.report_to: wandb could not start a run ({exc}); log in "
                            "with `wandb login`, or set WANDB_MODE=offline (and upload later "
                            "with `wandb sync`)") from exc
        for pattern in ("train/*", "eval/*"):  # records may repeat a step, or go back on resume
            self.run.define_metric(pattern, step_metric="step")
        entity = getattr(self.run, "entity", None)
        self.state = {"run_id": self.run.id, "project": getattr(self.run, "project", project),
                      "entity": entity if isinstance(entity, str) and entity else None}

    def log(self, step: int, scalars: dict[str, float], samples: list[dict]) -> None:
        data: dict[str, Any] = {"step": step, **scalars}
        if samples:
            columns = list(dict.fromkeys(k for s in samples for k in s))
            rows = [[str(s.get(c, "")) for c in columns] for s in samples]
            data["eval/samples"] = self.wandb.Table(columns=columns, data=rows)
        self.run.log(data)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _is_local_store(uri: str) -> bool:
    scheme = re.match(r"^([A-Za-z][\w+.-]*):", uri)
    return scheme is None or scheme[1].lower() == "file" or len(scheme[1]) == 1  # C:\ paths


class _MLflow:
    def __init__(self, run_dir: Path, recipe: dict[str, Any], resumed: bool, saved: dict):
        from mlflow.tracking import MlflowClient

        default_uri = (run_dir / "mlruns").as_uri()
        if saved.get("run_id"):
            uri = saved.get("tracking_uri") or default_uri
        else:
            uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri
        if _is_local_store(uri):  # MLflow 3 refuses its file store unless this opts in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        params = {k: v if len(v) <= MLFLOW_PARAM_MAX else v[:MLFLOW_PARAM_MAX - 3] + "..."
                  for k, v in flatten_recipe(recipe).items()}
        try:
            self.client = MlflowClient(tracking_uri=uri)
            run = self._existing(saved.get("run_id"), run_dir)
            if run is not None:
                self._update_params(run, params)
            else:
                run = self._create(run_dir, saved.get("experiment_name"), params)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"train.report_to: mlflow could not start a run at {uri} ({exc}); "
                            "check MLFLOW_TRACKING_URI") from exc
        self.run_id = run.info.run_id
        exp = self.client.get_experiment(run.info.experiment_id)
        self.state = {"run_id": self.run_id, "experiment_id": run.info.experiment_id,
                      "experiment_name": exp.name,
                      "tracking_uri": None if uri == default_uri else uri}

    def _existing(self, run_id: str | None, run_dir: Path):
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            log.warning("warning: the MLflow run %s of %s is gone; starting a new one", run_id,
                        run_dir)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run

    def _create(self, run_dir: Path, experiment: str | None, params: dict[str, str]):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            exp_id = found.experiment_id
        else:
            try:
                exp_id = self.client.create_experiment(name)
            except MlflowException:  # created meanwhile by another run
                exp_id = self.client.get_experiment_by_name(name).experiment_id
        run = self.client.create_run(exp_id, run_name=run_dir.name,
                                     tags={"pace_llm.run_dir": str(run_dir)})
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run

    def _update_params(self, run: Any, params: dict[str, str]) -> None:
        """A resumed run: new keys become params; params cannot change, so a changed value
        (e.g. train.lr applied on resume) is a tag ``resumed.<key>``."""
        from mlflow.entities import Param, RunTag

        old = run.data.params
        new = [Param(k, v) for k, v in params.items() if k not in old]
        tags = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in old and old[k] != v]
        for i in range(0, max(len(new), len(tags)), 100):
            self.client.log_batch(run.info.run_id, params=new[i:i + 100], tags=tags[i:i + 100])

    def log(self, step: int, scalars: dict[str, float], samples: list[dict]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, stamp, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        if samples:
            self.client.log_text(self.run_id, samples_markdown(samples),
                                 f"eval_samples/step-{step:07d}.md")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^\w.\- /]", "_", key)


OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


# --- the tracker

def require(name: str) -> None:
    """Import the backend's package, or a UserError naming the extra that installs it."""
    module = name  # each backend's package is named after it
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in (module, None) and not module.startswith(f"{exc.name}."):
            raise UserError(f"train.report_to: {name} cannot be imported ({exc}); reinstall "
                            f"it with pip install 'pace-llm[{name}]'") from exc
        raise UserError(f"train.report_to: {name} is not installed; pip install "
                        f"'pace-llm[{name}]'") from exc
    except Exception as exc:
        raise UserError(f"train.report_to: {name} cannot be imported ({exc}); reinstall it "
                        f"with pip install 'pace-llm[{name}]'") from exc


WANDB_HOST = "https://api.wandb.ai"
WANDB_NO_LOGIN_MODES = ("offline", "disabled", "dryrun")


def wandb_login_problem() -> str | None:
    """Why W&B could not start a run here, found without starting one (None: it can): outside
    offline mode it needs a key, in WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE or, where
    ``wandb login`` writes it, the netrc file ($NETRC, else ~/.netrc) for its host."""
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_MODE", "").lower() in WANDB_NO_LOGIN_MODES:
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    base = os.environ.get("WANDB_BASE_URL") or WANDB_HOST
    host = urlsplit(base).netloc or base
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        if netrc.netrc(str(path)).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):  # no file, or none wandb could read either
        pass
    return (f"train.report_to: wandb has no login here (no WANDB_API_KEY, no key for {host} in "
            f"{path}); run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to "
            "log locally and upload later with `wandb sync`")


def readiness_problems(backends: list[str]) -> list[str]:
    """Every reason a backend of train.report_to could not start, found before the run builds
    anything: not installed (or not importable), W&B without a login. Cheap; the parser runs
    it on every rank."""
    problems = []
    for name in dict.fromkeys(backends):
        try:
            require(name)
        except UserError as exc:
            problems.append(str(exc))
            continue
        if name == "wandb" and (problem := wandb_login_problem()):
            problems.append(problem)
    return problems


def check_installed(backends: list[str]) -> list[str]:
    """The backend names (train.report_to: the recipe schema allows only known ones), each
    once, every one importable; a UserError otherwise. Cheap: call it on every rank before a
    run starts, so that all ranks stop together."""
    names = list(dict.fromkeys(backends))
    for name in names:
        require(name)
    return names


def read_state(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``<run_dir>/tracking.json``: per backend, the ids a resumed run continues."""
    path = Path(run_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("warning: %s is unreadable (%s); the trackers start new runs", path, exc)
        return {}
    return state if isinstance(state, dict) else {}


class Tracker:
    """Sends metrics.jsonl records to the chosen backends (rank 0 only).

    ``Tracker.open(names, run_dir, recipe_dict, resumed)``, then ``log(record)`` per record,
    then ``close(ok)`` (also a context manager: an exception closes it as failed).
    """

    def __init__(self, backends: dict[str, Any], run_dir: Path):
        self.backends = backends
        self.run_dir = run_dir
        self._failed: set[str] = set()
        self.closed = False

    @classmethod
    def open(cls, backends: list[str], run_dir: Path, recipe_dict: dict[str, Any],
             resumed: bool) -> Tracker:
        names = check_installed(backends)  # every missing package named before any run starts
        run_dir = Path(run_dir).resolve()
        saved = read_state(run_dir) if resumed else {}
        opened: dict[str, Any] = {}
        try:
            for name in names:
                mine = saved.get(name) if isinstance(saved.get(name), dict) else {}
                try:
                    opened[name] = OPENERS[name](run_dir, recipe_dict, resumed, mine)
                except Exception as exc:
                    if (fault := write_fault(exc)) is None:
                        raise
                    log.warning("warning: train.report_to: %s cannot write in %s (%s); "
                                "training goes on without it", name, run_dir, fault)
        except BaseException:
            cls(opened, run_dir).close(ok=False)
            raise
        tracker = cls(opened, run_dir)
        if opened:
            tracker._write_state({**read_state(run_dir),
                                  **{n: b.state for n, b in opened.items()}})
        return tracker

    def _write_state(self, state: dict[str, Any]) -> None:
        atomic_write(self.run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")

    @property
    def state(self) -> dict[str, dict[str, Any]]:
        """Per open backend, what tracking.json keeps (run ids, log dir)."""
        return {name: dict(b.state) for name, b in self.backends.items()}

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record to every backend; a failing backend is a warning."""
        if not self.backends or self.closed:
            return
        step, scalars, samples = flatten_record(record)
        for name, backend in self.backends.items():
            try:
                backend.log(step, scalars, samples)
            except Exception as exc:  # noqa: BLE001 - a tracker never ends a training run
                if name not in self._failed:  # once per backend, not once per step
                    log.warning("warning: train.report_to: %s failed to log step %d (%s); "
                                "training goes on", name, step, exc)
                self._failed.add(name)

    def close(self, ok: bool = True) -> None:
        """Finish every run (``ok=False``: marked failed where the backend knows that)."""
        if self.closed:
            return
        self.closed = True
        for name, backend in self.backends.items():
            try:
                backend.close(ok)
            except Exception as exc:  # noqa: BLE001 - nor hides the error that ends it
                if name not in self._failed:  # a failed backend was named once already
                    log.warning("warning: train.report_to: %s failed to close (%s)", name, exc)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)
