"""train.report_to: every metrics.jsonl record reaches TensorBoard, W&B (offline) and MLflow
(local file store), read back with each backend's own reader; resume continues the same run."""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from pathlib import Path

import pytest

from pace_llm.errors import UserError
from pace_llm.schema import Recipe, recipe_to_dict
from pace_llm.tracking import Tracker, check_installed, flatten_recipe, flatten_record

SAMPLES = [{"prediction": "The answer is 72.\n#### 72", "reference": "#### 72"},
           {"prediction": "", "reference": "#### 5 | *not* markdown*"}]


def _eval(step: int, em: float, loss: float) -> dict:
    return {"step": step, "eval": {
        "metrics": {"exact_match": em, "pearson": None}, "metric": em, "examples": 50,
        "samples": SAMPLES, "fp_distance": 0.01 * step, "clean_grad_norm": 1.2,
        "output_grad_norm": 2.0, "eval_loss": loss, "extra": {"mismatched": {"accuracy": 0.5}}}}


def _train(step: int, loss: float) -> dict:
    return {"step": step, "task_loss": loss, "consistency_loss": 0.01 * step,
            "loss_ratio": 0.002, "grad_norm": 0.75, "clean_grad_norm": None, "lr": 1e-4,
            "tokens_per_s": 1234.5, "step_time_s": 0.25, "peak_memory_mb": 512.0,
            "skipped_steps": 0}


FIRST = [_eval(0, 0.0, 6.2), _train(10, 4.2), {"step": 15, "skipped_step": True,
                                                  "bad_in_a_row": 1},
         _train(20, 3.1), _eval(20, 0.25, 4.0)]
LATER = [_train(30, 2.5), _eval(30, 0.5, 3.0), _train(40, 2.0)]


def _expected(records: list[dict]) -> list[tuple[int, str, float]]:
    """(step, tracker name, value) of every scalar the records hold."""
    out = []
    for record in records:
        step, scalars, _ = flatten_record(record)
        out += [(step, key, value) for key, value in scalars.items()]
    return out


def _recipe(**train) -> dict:
    recipe = Recipe()
    recipe.lora.r = 16
    recipe.model.name_or_path = "/models/" + "x" * 700  # over MLflow's 500-character limit
    for key, value in train.items():
        setattr(recipe.train, key, value)
    return recipe_to_dict(recipe)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """W&B offline with its config and caches under tmp_path; no user tracking settings."""
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_API_KEY",
                 "WANDB_RESUME", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                 "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "WANDB_CONSOLE": "off", "WANDB_DISABLE_CODE": "true",
                        "WANDB_DISABLE_GIT": "true", "WANDB_CONFIG_DIR": home / "config",
                        "WANDB_CACHE_DIR": home / "cache", "WANDB_DATA_DIR": home / "data",
                        "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(name, str(value))


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)


# --- pure parts

def test_record_names():
    step, scalars, samples = flatten_record(FIRST[0])
    assert step == 0 and samples == SAMPLES
    assert scalars == {"eval/metrics/exact_match": 0.0, "eval/metric": 0.0, "eval/examples": 50.0,
                       "eval/fp_distance": 0.0, "eval/clean_grad_norm": 1.2,
                       "eval/output_grad_norm": 2.0, "eval/eval_loss": 6.2,
                       "eval/extra/mismatched/accuracy": 0.5}  # null pearson skipped
    step, scalars, samples = flatten_record(FIRST[1])
    assert step == 10 and samples == [] and "train/clean_grad_norm" not in scalars
    assert scalars["train/task_loss"] == 4.2 and scalars["train/skipped_steps"] == 0.0
    assert flatten_record(FIRST[2]) == (15, {"train/skipped_step": 1.0,
                                             "train/bad_in_a_row": 1.0}, [])


def test_recipe_params():
    params = flatten_recipe(_recipe(report_to=["mlflow"]))
    assert params["lora.r"] == "16" and params["train.lr"] == "0.0002"
    assert params["train.report_to"] == '["mlflow"]' and params["model.build"] == "None"
    assert params["lora.targets"] == "attn+mlp" and params["deepspeed"] == "None"


def test_schema_report_to(tmp_path):
    from pace_llm.config import load_recipe

    base = ["--model.name_or_path", str(tmp_path)]
    assert load_recipe(base).train.report_to == []
    assert load_recipe(base + ["--train.report_to", "[tensorboard]"]).train.report_to == [
        "tensorboard"]
    (tmp_path / "r.yaml").write_text("train:\n  report_to: [wandb, mlflow]\n")
    argv = ["--recipe", str(tmp_path / "r.yaml")] + base
    assert load_recipe(argv).train.report_to == ["wandb", "mlflow"]
    with pytest.raises(UserError, match=r"train\.report_to: .*neptune.* is not allowed; expected"):
        load_recipe(base + ["--train.report_to", "[neptune]"])
    (tmp_path / "bad.yaml").write_text("train:\n  report_to: [tensorboard, neptune]\n")
    with pytest.raises(UserError, match=r"train\.report_to: .*neptune.* is not allowed; expected"):
        load_recipe(["--recipe", str(tmp_path / "bad.yaml")] + base)


@pytest.mark.parametrize("bad", [["neptune"], "wandb", [None]])
def test_unknown_backend(tmp_path, bad):
    """The schema's list of tracker names refuses anything else when the recipe is parsed
    (the trackers never see it)."""
    from pace_llm.config import load_recipe

    (tmp_path / "r.yaml").write_text(json.dumps({"train": {"report_to": bad}}))
    with pytest.raises(UserError, match="train.report_to: .* is not allowed; expected a list of "
                       "'tensorboard', 'wandb', 'mlflow'"):
        load_recipe(["--recipe", str(tmp_path / "r.yaml"), "--model.name_or_path", "org/x"])


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_missing_backend_names_the_extra(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails
    with pytest.raises(UserError) as err:
        Tracker.open(["tensorboard", "wandb", "mlflow"], tmp_path, _recipe(), resumed=False)
    assert str(err.value) == (f"train.report_to: {name} is not installed; "
                              f"pip install 'pace-llm[{name}]'")
    assert list(tmp_path.iterdir()) == []  # checked before any backend started a run


def test_check_installed_on_every_rank():
    assert check_installed(["wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]
    assert check_installed([]) == []


def test_wandb_login_is_found_before_a_run_starts(tmp_path, monkeypatch):
    """readiness_problems: W&B needs a key (WANDB_API_KEY, or the netrc entry `wandb login`
    writes) unless it runs offline; a missing package is named too."""
    from pace_llm.tracking import readiness_problems

    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert readiness_problems(["wandb", "tensorboard"]) == []  # WANDB_MODE=offline (fixture)
    monkeypatch.delenv("WANDB_MODE")
    [problem] = readiness_problems(["wandb"])
    assert problem == (f"train.report_to: wandb has no login here (no WANDB_API_KEY, no key for "
                       f"api.wandb.ai in {tmp_path / 'netrc'}); run `wandb login` (or set "
                       "WANDB_API_KEY), or set WANDB_MODE=offline to log locally and upload "
                       "later with `wandb sync`")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
    assert readiness_problems(["wandb"]) == []
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert "no key for wandb.example.org" in readiness_problems(["wandb"])[0]
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    assert readiness_problems(["wandb"]) == []


def test_wandb_that_cannot_start_is_a_user_error(tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(UserError, match=r"wandb could not start a run \(api_key not configured "
                                        r"\(no-tty\)\); log in with `wandb login`, or set "
                                        r"WANDB_MODE=offline"):
        Tracker.open(["tensorboard", "wandb"], tmp_path, _recipe(), resumed=False)
    assert not (tmp_path / "tracking.json").exists()


def test_no_backends_is_a_no_op(tmp_path):
    with Tracker.open([], tmp_path, _recipe(), resumed=False) as tracker:
        tracker.log(FIRST[1])
    assert list(tmp_path.iterdir()) == []


class Flaky:
    def __init__(self, fail: bool):
        self.fail, self.steps, self.closed, self.state = fail, [], None, {}

    def log(self, step, scalars, samples):
        if self.fail:
            raise ConnectionError("server down")
        self.steps.append(step)

    def close(self, ok):
        self.closed = ok
        if self.fail:
            raise ConnectionError("server down")


def test_a_failing_backend_warns_once_and_training_goes_on(tmp_path, caplog):
    bad, good = Flaky(True), Flaky(False)
    with pytest.raises(RuntimeError), Tracker({"mlflow": bad, "tensorboard": good},
                                              tmp_path) as tracker:
        for record in FIRST:
            tracker.log(record)
        raise RuntimeError("the training run failed")
    assert good.steps == [0, 10, 15, 20, 20] and good.closed is False and bad.closed is False
    warned = [r.getMessage() for r in caplog.records if "failed to log" in r.getMessage()]
    assert warned == [("warning: train.report_to: mlflow failed to log step 0 (server down); "
                       "training goes on")]


# --- TensorBoard, read with its EventAccumulator

def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0,
                                                                        "tensors": 0})
    acc.Reload()
    return acc


def _assert_scalars(read, records):
    """``read(key)`` -> [(step, value)]; each scalar of each record is there once."""
    for step, key, value in _expected(records):
        found = [v for s, v in read(key) if s == step]
        assert len(found) == 1 and _close(found[0], value), (key, step, value, found)


def test_tensorboard(tmp_path):
    with Tracker.open(["tensorboard"], tmp_path, _recipe(), resumed=False) as tracker:
        for record in FIRST:
            tracker.log(record)
    state = json.loads((tmp_path / "tracking.json").read_text())
    assert state == {"tensorboard": {"log_dir": "tensorboard"}}
    acc = _tensorboard(tmp_path)
    read = lambda key: [(e.step, e.value) for e in acc.Scalars(key)]
    _assert_scalars(read, FIRST)
    assert set(acc.Tags()["scalars"]) == {k for _, k, _ in _expected(FIRST)}
    texts = {e.step: e.tensor_proto.string_val[0].decode()
             for e in acc.Tensors("eval/samples/text_summary")}
    assert sorted(texts) == [0, 20] and "    The answer is 72.\n    #### 72" in texts[20]
    recipe = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    lora:\n      r: 16" in recipe

    with Tracker.open(["tensorboard"], tmp_path, _recipe(), resumed=True) as tracker:
        for record in LATER:
            tracker.log(record)
    assert json.loads((tmp_path / "tracking.json").read_text()) == state
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # same dir, one file a session
    acc = _tensorboard(tmp_path)
    _assert_scalars(lambda key: [(e.step, e.value) for e in acc.Scalars(key)], FIRST + LATER)


def test_tensorboard_resume_after_a_crash_replaces_the_redone_steps(tmp_path):
    with Tracker.open(["tensorboard"], tmp_path, _recipe(), resumed=False) as tracker:
        for step in (10, 20, 30):  # checkpoint at 10; steps 20 and 30 are lost in the crash
            tracker.log(_train(step, 100.0 + step))
    with Tracker.open(["tensorboard"], tmp_path, _recipe(), resumed=True) as tracker:
        for step in (20, 30, 40):
            tracker.log(_train(step, float(step)))
    acc = _tensorboard(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("train/task_loss")] == [
        (10, 110.0), (20, 20.0), (30, 30.0), (40, 40.0)]


# --- W&B offline, read from its transaction log (<run_dir>/wandb/offline-run-*/run-ID.wandb)

def _wandb_records(path: Path):
    """The protobuf records of a .wandb file (a LevelDB-style log: a 7-byte file header, then
    32 KiB blocks of [crc32, length, type] chunks; type 1 whole, 2/3/4 first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    block, buf, pos, parts = 32768, path.read_bytes(), 7, []
    assert buf[:4] == b":W&B"
    while pos + 7 <= len(buf):
        space = block - pos % block
        if space < 7:
            pos += space
            continue
        _, size, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if kind == 0 and size == 0:  # padding to the block's end
            pos += space
            continue
        data, pos = buf[pos + 7:pos + 7 + size], pos + 7 + size
        parts = [data] if kind in (1, 2) else parts + [data]
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def _wandb_log(session: Path, timeout: float = 60.0) -> list:
    """The records of a finished offline session: wandb-core may write its file after
    run.finish() returns, so wait for the exit record."""
    deadline = time.monotonic() + timeout
    while True:
        for path in session.glob("run-*.wandb"):
            records = list(_wandb_records(path))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        assert time.monotonic() < deadline, f"{session}: no finished .wandb after {timeout} s"
        time.sleep(0.05)


def _wandb_runs(run_dir: Path) -> list[dict]:
    """Per offline session (oldest first): run id, project, config and history rows."""
    out = []
    for session in sorted((run_dir / "wandb").glob("offline-run-*")):
        run = {"dir": session, "rows": []}
        for record in _wandb_log(session):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, project=record.run.project,
                           name=record.run.display_name, config={
                    i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                run["rows"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in record.history.item})
        out.append(run)
    return out


def _wandb_read(runs: list[dict]):
    rows = [row for run in runs for row in run["rows"]]
    return lambda key: [(row["step"], row[key]) for row in rows if key in row]


def test_wandb_offline(tmp_path):
    with Tracker.open(["wandb"], tmp_path, _recipe(), resumed=False) as tracker:
        for record in FIRST:
            tracker.log(record)
    state = json.loads((tmp_path / "tracking.json").read_text())["wandb"]
    assert state["project"] == "pace-llm" and state["run_id"]
    [run] = _wandb_runs(tmp_path)
    assert run["id"] == state["run_id"] and run["project"] == "pace-llm"
    assert run["name"] == tmp_path.name
    assert run["config"]["lora"]["r"] == 16 and run["config"]["train"]["report_to"] == []
    _assert_scalars(_wandb_read([run]), FIRST)
    tables = [row for row in run["rows"] if "eval/samples/path" in row]
    assert [row["step"] for row in tables] == [0, 20]
    table = json.loads((run["dir"] / "files" / tables[-1]["eval/samples/path"]).read_text())
    assert table["columns"] == ["prediction", "reference"]
    assert table["data"] == [[s["prediction"], s["reference"]] for s in SAMPLES]

    with Tracker.open(["wandb"], tmp_path, _recipe(lr=1e-4), resumed=True) as tracker:
        for record in LATER:
            tracker.log(record)
    first, second = _wandb_runs(tmp_path)  # offline: one directory a session, same run id
    assert second["id"] == first["id"] == state["run_id"]
    assert second["config"]["train"]["lr"] == 1e-4
    _assert_scalars(_wandb_read([second]), LATER)
    _assert_scalars(_wandb_read([first, second]), FIRST + LATER)


def test_wandb_honours_the_project_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    Tracker.open(["wandb"], tmp_path, _recipe(), resumed=False).close()
    assert json.loads((tmp_path / "tracking.json").read_text())["wandb"]["project"] == (
        "my-project")
    assert _wandb_runs(tmp_path)[0]["project"] == "my-project"


# --- MLflow, read with MlflowClient from the local file store

def _mlflow(run_dir: Path, uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or (run_dir / "mlruns").as_uri())


def _mlflow_read(client, run_id):
    return lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_mlflow(tmp_path):
    with Tracker.open(["mlflow"], tmp_path, _recipe(), resumed=False) as tracker:
        for record in FIRST:
            tracker.log(record)
    state = json.loads((tmp_path / "tracking.json").read_text())["mlflow"]
    assert state["experiment_name"] == "pace-llm" and state["tracking_uri"] is None
    client = _mlflow(tmp_path)
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == state["experiment_id"]
    params = run.data.params
    assert params["lora.r"] == "16" and params["train.lr"] == "0.0002"
    assert len(params["model.name_or_path"]) == 500 and params["model.name_or_path"].endswith(
        "...")
    _assert_scalars(_mlflow_read(client, state["run_id"]), FIRST)
    assert set(run.data.metrics) == {k for _, k, _ in _expected(FIRST)}
    files = [f.path for f in client.list_artifacts(state["run_id"], "eval_samples")]
    assert files == ["eval_samples/step-0000000.md", "eval_samples/step-0000020.md"]
    text = (Path(run.info.artifact_uri.removeprefix("file://")) / files[1]).read_text()
    assert "    The answer is 72.\n    #### 72" in text and "(empty)" in text

    with Tracker.open(["mlflow"], tmp_path, _recipe(lr=1e-4), resumed=True) as tracker:
        tracker.log(LATER[0])
        assert client.get_run(state["run_id"]).info.status == "RUNNING"
        for record in LATER[1:]:
            tracker.log(record)
    assert json.loads((tmp_path / "tracking.json").read_text())["mlflow"] == state
    run = client.get_run(state["run_id"])
    assert run.data.params["train.lr"] == "0.0002"  # params are immutable in MLflow
    assert run.data.tags["resumed.train.lr"] == "0.0001"
    _assert_scalars(_mlflow_read(client, state["run_id"]), FIRST + LATER)
    assert len(client.search_runs([state["experiment_id"]])) == 1


def test_mlflow_honours_the_tracking_uri_and_marks_failures(tmp_path, monkeypatch):
    uri = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(RuntimeError), Tracker.open(["mlflow"], run_dir, _recipe(),
                                                   resumed=False) as tracker:
        tracker.log(FIRST[1])
        raise RuntimeError("crash")
    state = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert state["tracking_uri"] == uri and state["experiment_name"] == "mine"
    assert not (run_dir / "mlruns").exists()
    assert _mlflow(run_dir, uri).get_run(state["run_id"]).info.status == "FAILED"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # a resumed run stays with its own store
    with Tracker.open(["mlflow"], run_dir, _recipe(), resumed=True) as tracker:
        tracker.log(FIRST[3])
    _assert_scalars(_mlflow_read(_mlflow(run_dir, uri), state["run_id"]), FIRST[1:2] + FIRST[3:4])


# --- all three at once, and a fresh (not resumed) run in a directory that had one

def test_all_three_and_a_fresh_start(tmp_path):
    names = ["tensorboard", "wandb", "mlflow", "wandb"]
    with Tracker.open(names, tmp_path, _recipe(), resumed=False) as tracker:
        assert list(tracker.backends) == ["tensorboard", "wandb", "mlflow"]
        for record in FIRST:
            tracker.log(record)
        first = tracker.state
    assert json.loads((tmp_path / "tracking.json").read_text()) == first
    with Tracker.open(["wandb", "mlflow"], tmp_path, _recipe(), resumed=False) as tracker:
        second = tracker.state
    assert second["wandb"]["run_id"] != first["wandb"]["run_id"]
    assert second["mlflow"]["run_id"] != first["mlflow"]["run_id"]
    assert json.loads((tmp_path / "tracking.json").read_text()) == {**first, **second}
    acc = _tensorboard(tmp_path)
    _assert_scalars(lambda key: [(e.step, e.value) for e in acc.Scalars(key)], FIRST)
