"""Data at scale: the task cache (tokenize once, Arrow, memory-mapped by every rank) against the
Python path (every rank tokenizes every row into Python lists), at 50 k and 1 M rows.

    OMP_NUM_THREADS=1 python bench/data_scale.py [--rows 50000,1000000] [--ranks 1,2]
        [--old-rows 50000] [--num-proc 2] [--work DIR] [--write-results]

Data        a seeded synthetic Alpaca-format jsonl (instruction / input / output, ~370 characters
            a row, half the inputs empty), written to ``--work`` (outside the repository; default
            $TMPDIR/pace_llm_data_scale); the N-row file is the first N rows of one generator.
Tokenizer   the tests' sentencepiece BPE (512 pieces; tests/conftest.save_fixture_tokenizer).
Task        instruct, prompt_style plain (pace_llm's default chat layout), max_length 1024,
            on_too_long drop; no eval file, so the last 200 rows are held out for evaluation.
A start     ``--ranks`` fresh processes (2: a gloo group), each: ``build_task`` (timed), 16 random
            ``task.train[i]`` reads and ``task.lengths`` -> "data" figures; then one ``EpochOrder``
            epoch (global batch 16: the trainer's order: one integer array, 8 bytes a row, the same on both
            paths) and the collation of its first 2 batches -> "+ epoch" figures. RSS is the
            rank's ``ru_maxrss`` (the tokenizing workers are separate processes, their peak is
            reported apart); "private" is RssAnon at that point: RSS without the pages of the
            memory-mapped cache files (page cache, shared by every rank on the node; the kernel
            maps whole large folios, so each random row read adds up to ~1 MB of them here).
cache       a first start on an empty cache directory (rank 0 tokenizes with ``--num-proc``
            processes), then the same start again ("cached"). "tokenized by" counts the ranks that
            built the cache (from ``pace_llm.data.cache._build_into`` calls).
python      ``pace_llm.data.build.build_lists``: the same row -> example functions, one loop, Python
            lists, in every rank, on every start (no cache). Run at ``--old-rows`` only; larger
            sizes are extrapolated linearly (time and RSS above the pre-build baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have "
         "this from or had by hot word but what some we can out other were all there when up use "
         "your how said an each she which do their time if will way about many then them write "
         "would like so these her long make thing see him two has look more day could go come "
         "did number sound no most people my over know water than call first who may down side "
         "been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form "
         "sentence great think say help low line differ turn cause much mean before move right "
         "boy old too same tell does set three want air well also play small end put home read "
         "hand port large spell add even land here must big high such follow act why ask men "
         "change went light kind off need house picture try us again animal point mother world "
         "near build self earth father head stand own page should country found answer school "
         "grow study still learn plant cover food sun four between state keep eye never last let "
         "thought city tree cross farm hard start might story saw far sea draw left late run").split()


def rows(n: int, seed: int = 0):
    """n Alpaca rows from one seeded generator (the first n rows of any larger n)."""
    r = random.Random(seed)
    for _ in range(n):
        yield {"instruction": " ".join(r.choices(WORDS, k=r.randint(8, 20))).capitalize() + ".",
               "input": " ".join(r.choices(WORDS, k=r.randint(5, 30))) if r.random() < 0.5
               else "",
               "output": " ".join(r.choices(WORDS, k=r.randint(25, 60))).capitalize() + "."}


def data_file(work: Path, n: int) -> Path:
    path = work / f"alpaca-{n}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for row in rows(n):
                f.write(json.dumps(row) + "\n")
        tmp.rename(path)
    return path


def tokenizer_dir(work: Path) -> Path:
    out = work / "tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import save_fixture_tokenizer

        save_fixture_tokenizer(out)
    return out


# ------------------------------------------------------------------------------ one rank

def maxrss_mb(who: int = 0) -> float:
    return resource.getrusage(who or resource.RUSAGE_SELF).ru_maxrss / 1024


def private_mb() -> float:
    """Resident anonymous memory now (not the mapped page cache of the cache's files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> None:
    """One rank of one start; writes its figures to spec["out"]."""
    rank, world = spec["rank"], spec["world"]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(spec["port"]))
    import logging

    import torch.distributed as dist
    from transformers import AutoTokenizer

    from pace_llm.schema import DataArgs
    from pace_llm.data import cache
    from pace_llm.data.batches import EpochOrder
    from pace_llm.data.build import build_lists, build_task
    from pace_llm.data.collate import collate_causal

    built = []
    real = cache._build_into

    def counted(*args, **kwargs):
        built.append(rank)
        return real(*args, **kwargs)

    cache._build_into = counted
    logging.getLogger("pace_llm").setLevel(logging.ERROR)  # the same notices from every rank
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    base = maxrss_mb()
    data = DataArgs(task="instruct", path=spec["path"], max_length=1024, on_too_long="drop",
                    num_proc=spec["num_proc"], cache_dir=spec["cache_dir"])
    started = time.perf_counter()
    task = (build_task if spec["mode"] == "cache" else build_lists)(data, tok)
    build_s = time.perf_counter() - started
    r = random.Random(rank)
    for _ in range(16):
        task.train[r.randrange(len(task.train))]
    lengths = task.lengths
    data_point = {"rss_data_mb": maxrss_mb(), "private_data_mb": private_mb()}
    order = EpochOrder(lengths, 16, seed=0)
    epoch = order.epoch(0)
    for batch in epoch[:2].tolist():
        collate_causal(task.examples(batch), tok.pad_token_id or 0)
    figures = {"rank": rank, "build_s": build_s, **data_point, "rss_mb": maxrss_mb(),
               "private_mb": private_mb(), "base_mb": base,
               "workers_mb": maxrss_mb(resource.RUSAGE_CHILDREN), "built": len(built),
               "rows": len(task.train), "tokens": task.stats["tokens"],
               "batches": order.steps_per_epoch}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    Path(spec["out"]).write_text(json.dumps(figures))


def start(args: argparse.Namespace, work: Path, n: int, world: int, mode: str,
          cache_dir: Path) -> list[dict]:
    """One start of ``world`` fresh rank processes; each rank's figures."""
    from pace_llm.distributed import free_port

    port = free_port()
    outs = [work / f"rank{r}.json" for r in range(world)]
    procs = []
    for r, out in enumerate(outs):
        out.unlink(missing_ok=True)
        spec = {"rank": r, "world": world, "port": port, "mode": mode, "out": str(out),
                "path": str(data_file(work, n)), "tokenizer": str(tokenizer_dir(work)),
                "num_proc": args.num_proc, "cache_dir": str(cache_dir)}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                                      cwd=REPO, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed ({codes}): {n} rows, {world} rank(s), {mode}")
    return [json.loads(out.read_text()) for out in outs]


# ------------------------------------------------------------------------------ the table

def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    results = []
    sizes = [int(x) for x in args.rows.split(",")]
    for n in sizes:
        data_file(work, n)
        for world in [int(x) for x in args.ranks.split(",")]:
            cache_dir = work / f"cache-{n}-{world}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            first = start(args, work, n, world, "cache", cache_dir)
            cached = start(args, work, n, world, "cache", cache_dir)
            results.append({"rows": n, "path": "cache", "ranks": world, "first": first,
                            "cached": cached})
            print(row_text(results[-1]), flush=True)
            shutil.rmtree(cache_dir, ignore_errors=True)
            if n == args.old_rows:
                old = start(args, work, n, world, "python", cache_dir)
                results.append({"rows": n, "path": "python", "ranks": world, "first": old,
                                "cached": None})
                print(row_text(results[-1]), flush=True)
    return results


def row_text(res: dict) -> str:
    first, cached = res["first"], res["cached"]

    def rss(ranks: list[dict], key: str) -> str:
        return "/".join(f"{x[key]:.0f}" for x in ranks)

    built = sum(x["built"] for x in first) if res["path"] == "cache" else len(first)
    last = cached or first
    return (f"| {res['rows']:,} | {res['path']} | {res['ranks']} | "
            f"{max(x['build_s'] for x in first):.1f} | "
            + (f"{max(x['build_s'] for x in cached):.2f}" if cached else "= first") + " | "
            + " | ".join(rss(first if k == "first" else last, key) for k, key in COLUMNS) + " | "
            f"{first[0]['base_mb']:.0f} | {first[0]['workers_mb']:.0f} | {built} | "
            f"{first[0]['rows']:,} | {first[0]['tokens']:,} |")


COLUMNS = (("first", "rss_data_mb"), ("first", "rss_mb"), ("cached", "rss_data_mb"),
           ("cached", "private_data_mb"), ("cached", "rss_mb"), ("cached", "private_mb"))


HEADER = ("| rows | path | ranks | first start: build (s) | cached start: build (s) | "
          "first start: peak RSS/rank, data (MB) | first: + epoch (MB) | cached start: peak "
          "RSS/rank, data (MB) | cached: private, data (MB) | cached: peak RSS + epoch (MB) | "
          "cached: private + epoch (MB) | RSS before build (MB) | tokenizing workers' peak (MB) "
          "| ranks that tokenized | train rows | tokens |\n" + "|---" * 16 + "|")


def verdicts(results: list[dict], big: int) -> list[str]:
    out = []
    cache = [r for r in results if r["path"] == "cache"]
    worst = max(max(x["build_s"] for x in r["cached"]) for r in cache)
    out.append(f"- cached start under 10 s: {'yes' if worst < 10 else 'NO'} (slowest "
               f"{worst:.2f} s, the build_task call of the slowest rank)")
    for kind, key, what in (("cached", "rss_data_mb", "peak RSS (data)"),
                            ("first", "rss_data_mb", "peak RSS (data)"),
                            ("cached", "private_data_mb", "private memory (data)"),
                            ("cached", "rss_mb", "peak RSS (+ epoch)"),
                            ("cached", "private_mb", "private memory (+ epoch)")):
        for world in sorted({r["ranks"] for r in cache}):
            rss = {r["rows"]: max(x[key] for x in r[kind]) for r in cache
                   if r["ranks"] == world}
            if len(rss) > 1:
                lo, hi = rss[min(rss)], rss[max(rss)]
                out.append(f"- {what} per rank, {kind} start, {world} rank(s), {min(rss):,} -> "
                           f"{max(rss):,} rows: {lo:.0f} -> {hi:.0f} MB ({100 * (hi / lo - 1):+.1f}"
                           f" %; target within 20 %: {'yes' if hi <= 1.2 * lo else 'NO'})")
    for r in cache:
        if r["ranks"] > 1:
            once = sum(x["built"] for x in r["first"]) == 1 and not any(
                x["built"] for x in r["cached"])
            out.append(f"- {r['ranks']} ranks, {r['rows']:,} rows: tokenized once: "
                       f"{'yes' if once else 'NO'}")
    for r in results:
        if r["path"] == "python":
            scale = big / r["rows"]
            x = max(r["first"], key=lambda f: f["rss_mb"])
            rss = x["base_mb"] + (x["rss_mb"] - x["base_mb"]) * scale
            seconds = max(f["build_s"] for f in r["first"]) * scale
            out.append(f"- python path, {r['ranks']} rank(s), {big:,} rows: skipped; linear "
                       f"extrapolation from {r['rows']:,}: ~{seconds:.0f} s per start and "
                       f"~{rss / 1024:.1f} GB per rank")
    return out


def write_results(text: str) -> None:
    path = REPO / "bench" / "RESULTS.md"
    heading = "## Data at scale (bench/data_scale.py)"
    current = path.read_text()
    add = ("" if current.endswith("\n") else "\n") + (
        "" if heading in current else f"\n{heading}\n")
    path.write_text(current + add + "\n" + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="50000,1000000")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--old-rows", type=int, default=50000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) /
                                              "pace_llm_data_scale"))
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    work = Path(args.work).resolve()
    if REPO in work.parents or work == REPO:
        raise SystemExit(f"--work {work} is inside the repository; use a directory outside it")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(HEADER, flush=True)
    results = measure(args, work)
    big = max(int(x) for x in args.rows.split(","))
    lines = verdicts(results, big)
    print("\n".join(lines))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    command = "OMP_NUM_THREADS=1 python bench/data_scale.py " + " ".join(
        a for a in sys.argv[1:] if a != "--write-results")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True, check=False).stdout.strip()
    text = (f"### Run of {time.strftime('%Y-%m-%d %H:%M')} ({os.cpu_count()} CPUs, "
            f"{time.perf_counter() - started:.0f} s in all; on top of commit {commit})\n\n"
            f"    {command.strip()}\n\n"
            "data = after build_task, 16 random task.train[i] reads and task.lengths; + epoch = "
            "also one EpochOrder epoch (the trainer's order, one integer array, the same on both paths) and two "
            "collated batches; private = RssAnon, i.e. RSS less the page cache of the memory-"
            "mapped cache files (shared by the ranks). python = build_lists: every rank tokenizes "
            "into Python lists.\n\n"
            f"{HEADER}\n"
            + "\n".join(row_text(r) for r in results) + "\n\n" + "\n".join(lines) + "\n")
    if args.write_results:
        write_results(text)


if __name__ == "__main__":
    main()
