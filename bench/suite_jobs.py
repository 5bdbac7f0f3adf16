"""The throughput jobs of bench/gpu_suite.py: the plan (contender x micro-batch x axis value x
repeat, in priority order), the time estimate the budget is checked against, each job's worker
config, and the loop that runs them one at a time (the next process imports its libraries
while the current one measures), recording a failing job and going on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import suite_report as R
import throughput as TP

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHAPE_CONTENDERS = {"16": ("off", "peft", "full", "lazy"), "64": ("off", "full", "peft")}
WINDOWS = ["on", "off", "off", "on"]
RESERVE_S = 12  # kept for the summary and the archive
LIVE: list[subprocess.Popen] = []  # started, not yet finished


class StageError(Exception):
    """A stage failed; the message says how."""


@dataclass
class Job:
    who: str
    shape: str
    micro: int
    pad: int = 1
    compile: bool = False
    repeat: int = 1

    @property
    def key(self) -> str:
        return (f"{self.who}-mb{self.shape}" + (f"-pad{self.pad}" if self.pad > 1 else "")
                + ("-compile" if self.compile else ""))

    @property
    def tag(self) -> str:
        return f"{self.key}-r{self.repeat}"


def plan_jobs(contenders: list[str], shapes: list[str], micro: dict[str, int],
              pads: list[int], compile_axis: bool, repeats: int) -> list[Job]:
    first = [Job(w, s, micro[s]) for s in shapes for w in SHAPE_CONTENDERS[s] if w in contenders]
    if "16" in shapes:
        first += [Job(w, "16", micro["16"], pad=m) for m in pads if m > 1
                  for w in ("off", "peft") if w in contenders]
        if compile_axis and "off" in contenders:
            first.append(Job("off", "16", micro["16"], compile=True))
    jobs = list(first)
    for r in range(2, repeats + 1):
        jobs += [replace(j, repeat=r) for j in (first[::-1] if r % 2 == 0 else first)]
    return jobs


def estimate(job: Job, done: list[dict], default: dict[str, float]) -> float:
    same = [d["duration_s"] for d in done if d["key"] == job.key and d["status"] == "ok"]
    if same:
        return max(same)
    shape = [d["duration_s"] for d in done if d["shape"] == job.shape and d["status"] == "ok"]
    return max(shape) * (1.3 if job.who == "full" else 1.0) if shape else default[job.shape]

# --------------------------------------------------------------------------- processes
def spawn(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    f = open(log, "w")
    p = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                         env=env, start_new_session=True)
    p.log_file = f  # type: ignore[attr-defined]
    LIVE.append(p)
    return p


def finish(p: subprocess.Popen, timeout: float) -> int:
    try:
        rc = p.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        rc = 124
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the process group this suite started
    except ProcessLookupError:
        pass
    p.wait()
    p.log_file.close()  # type: ignore[attr-defined]
    if p in LIVE:
        LIVE.remove(p)
    return rc


def stop_all() -> None:
    """End every process group this suite started and has not finished (by their ids)."""
    for p in list(LIVE):
        finish(p, 0)


def tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def job_config(a, job: Job, base: dict, work: Path, fields: dict) -> dict:
    n = a.window_steps[job.shape]
    flags = [i % 2 == 0 for i in range(a.warmup)]
    for label in WINDOWS:
        flags += [label == "on"] * n
    extra = []
    if job.who != "peft":
        if fields.get("data.pad_to_multiple_of"):
            extra += ["--data.pad_to_multiple_of", str(job.pad)]
        if fields.get("train.compile"):
            extra += ["--train.compile", "true" if job.compile else "false"]
    jw = work / "jobs" / job.tag
    jw.mkdir(parents=True, exist_ok=True)
    cfg = dict(base, workdir=str(jw), recipe=str(jw / "recipe.yaml"), micro_batch=job.micro,
               warmup=a.warmup, steps=n * len(WINDOWS), total_steps=len(flags) + 1,
               window_steps=n, windows=WINDOWS, flags=flags + [True], log_every=TP.LOG_EVERY,
               marks=[a.warmup + i * n for i in range(len(WINDOWS) + 1)], who=job.who,
               pad=job.pad, pace_extra=extra, go=str(jw / "go"), fail=job.key in a.fail)
    TP.write_recipe(cfg)
    (jw / "config.json").write_text(json.dumps(cfg))
    return cfg


def launch(a, job: Job, base: dict, work: Path, env: dict, fields: dict,
           spawned: dict[str, subprocess.Popen]) -> None:
    """Start a job's process: it imports its libraries, then waits for its go file and reads
    its config again (written anew at go time, with the recipe fields prepare found)."""
    jw = job_config(a, job, base, work, fields)["workdir"]
    spawned[job.tag] = spawn([str(BENCH / "suite_worker.py"), "tp", jw + "/config.json",
                              jw + "/result.json"], work / "logs" / f"{job.tag}.log", env)


def run_jobs(a, jobs: list[Job], base: dict, work: Path, env: dict, deadline: float,
             fields: dict, counts: dict, s: dict,
             spawned: dict[str, subprocess.Popen] | None = None) -> None:
    """Run the jobs in order while the budget lasts; ``spawned``: processes already started
    (the first job's, started while prepare ran)."""
    default = {"16": 75.0, "64": 90.0} if not a.dry_run else {"16": 30.0, "64": 30.0}
    spawned = {} if spawned is None else spawned

    done: list[dict] = []
    for i, job in enumerate(jobs):
        need, left = estimate(job, done, default), deadline - time.monotonic() - RESERVE_S
        record = {**asdict(job), "key": job.key, "tag": job.tag, "estimate_s": need}
        if need > left:
            s["skipped"].append({"stage": "throughput", "job": job.tag,
                                 "message": f"budget: needs ~{need:.0f} s, {left:.0f} s left"})
            if job.tag in spawned:
                finish(spawned.pop(job.tag), 0)
            continue
        if job.tag not in spawned:
            launch(a, job, base, work, env, fields, spawned)
        p = spawned.pop(job.tag)
        if not a.no_prefetch and i + 1 < len(jobs) and jobs[i + 1].tag not in spawned:
            launch(a, jobs[i + 1], base, work, env, fields, spawned)  # imports meanwhile
        cfg = job_config(a, job, base, work, fields)  # what the process reads at go
        Path(cfg["go"]).touch()
        t = time.monotonic()
        rc = finish(p, min(a.job_timeout, deadline - time.monotonic() - RESERVE_S / 2))
        record.update(duration_s=time.monotonic() - t, rc=rc, status="failed")
        result = Path(cfg["workdir"]) / "result.json"
        log = work / "logs" / f"{job.tag}.log"
        try:
            if rc or not result.is_file():
                raise StageError(f"rc {rc}{' (stopped: timeout)' if rc == 124 else ''}, "
                                 "no result")
            res = json.loads(result.read_text())
            record["metrics"] = R.job_metrics(res, cfg, counts, a.peak_tflops * 1e12)
            record["status"] = "ok"
            with open(work / "windows.jsonl", "a") as f:
                f.write(json.dumps({"tag": job.tag, "config": {k: cfg[k] for k in (
                    "micro_batch", "warmup", "window_steps", "windows", "flags", "pad",
                    "pace_extra")}, "steps": res["steps"], "mem": res["mem"],
                    "window_peaks_mb": res.get("window_peaks_mb")}) + "\n")
        except Exception as exc:  # one failing job is recorded, the suite goes on
            s["errors"].append({"stage": "throughput", "job": job.tag,
                                "message": f"{type(exc).__name__}: {exc}",
                                "log_tail": tail(log)})
        done.append(record)
        s["runs"].append(record)
        m = record.get("metrics", {}).get("by_cudnn", {})
        print(f"[{time.monotonic() - s['_t0']:5.0f} s] {job.tag:22s} {record['status']:6s} "
              f"{record['duration_s']:5.1f} s  " + "  ".join(
                  f"cuDNN {k}: {v['tokens_per_s']:8.0f} tok/s, step {v['mean_step_s']:.3f}/"
                  f"{v['median_step_s']:.3f} s" for k, v in m.items()), flush=True)
    for p in spawned.values():
        finish(p, 0)
