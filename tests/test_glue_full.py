"""bench/glue_full.py's dry run, end to end: fixture CoLA and SST-2, a tiny random-init BERT with
a WordPiece tokenizer trained here, every phase (prepare, lr curve, σ/λ tuning, final seeds) as
real pace_llm/train.py subprocesses; then resumption and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT / "tests" / "fixtures" / "glue"
FIELDS = {"task", "mode", "seed", "train_rows", "split", "metric_name", "metric", "sigma", "lam",
          "lr", "epochs", "steps", "wall_s", "fp_distance", "output_grad_norm"}


def fixture_sentences() -> list[str]:
    out = []
    for path in sorted((GLUE / "CoLA").glob("*.tsv")):
        out += [ln.split("\t")[3] for ln in path.read_text().splitlines() if ln.strip()]
    for path in sorted((GLUE / "SST-2").glob("*.tsv")):
        out += [ln.split("\t")[0] for ln in path.read_text().splitlines()[1:] if ln.strip()]
    return out


def save_tiny_bert(out: Path) -> Path:
    """A 2-layer BERT (no head: the run adds one, as for the real base) and a 400-piece
    WordPiece tokenizer trained on the fixture sentences, saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(fixture_sentences(),
                            trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=160,
                     pad_token_id=fast.pad_token_id)
    BertModel(cfg).save_pretrained(out)
    return out


def glue_full(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HOME=str(tmp / "home"),
               XDG_CACHE_HOME=str(tmp / "xdg"), HF_HOME=str(tmp / "hf"),
               MPLCONFIGDIR=str(tmp / "mpl"), PACE_LLM_CACHE=str(tmp / "pace_cache"),
               TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, str(ROOT / "bench" / "glue_full.py"), *args],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def test_dry_run_end_to_end_resumes_and_reports(tmp_path):
    model = save_tiny_bert(tmp_path / "tiny_bert")
    results = tmp_path / "out" / "glue_full.jsonl"
    work = tmp_path / "work"
    common = ("--dry-run", "--glue-dir", str(GLUE), "--model", str(model), "--work", str(work),
              "--results", str(results))

    # prepare reads both layouts (CoLA release, alps SST-2) and writes GLUE-layout splits:
    # CoLA's held-out slice comes out of its 200 fixture rows, SST-2's is disjoint from its 64
    res = glue_full("prepare", *common, tmp=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    info = {t: json.loads((work / "data" / t / "info.json").read_text()) for t in ("cola", "sst2")}
    assert (info["cola"]["glue_train_rows"], info["cola"]["dev_rows"]) == (200, 100)
    assert (info["cola"]["tune_train_rows"], info["cola"]["heldout_rows"]) == (160, 40)
    assert (info["sst2"]["glue_train_rows"], info["sst2"]["dev_rows"]) == (300, 100)
    assert (info["sst2"]["final_train_rows"], info["sst2"]["heldout_rows"]) == (64, 32)
    assert info["sst2"]["heldout_disjoint"] and not info["cola"]["heldout_disjoint"]
    assert info["cola"]["share_within_max_length"] == 1.0
    for task in ("cola", "sst2"):
        tune_dev = (work / "data" / task / "tune" / "dev.tsv").read_text().splitlines()
        final_train = (work / "data" / task / "final" / "train.tsv").read_text().splitlines()
        assert tune_dev[0] == final_train[0] == "sentence\tlabel"
        overlap = set(tune_dev[1:]) & set(final_train[1:])
        assert len(overlap) == (len(set(tune_dev[1:])) if task == "cola" else 0)

    # every phase on CoLA as real train.py runs (forked from the script): the lr curve (1 lr,
    # 2 epochs), tuning (the off reference + 1 full point), final (2 seeds x off/full) on the
    # fixture's GLUE dev. --seeds narrows the final phase (to share it between two processes):
    # seed 1 first, then the rest of the protocol's seeds in a second invocation
    args = (*common, "--tasks", "cola")
    wrong = glue_full("final", *args, "--seeds", "7", tmp=tmp_path)
    assert wrong.returncode == 2
    assert "--seeds 7: the protocol's seeds are 0 1; pick among them" in wrong.stderr
    res = glue_full("all", *args, "--seeds", "1", tmp=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [(json.loads(ln)["phase"], json.loads(ln)["seed"])
            for ln in results.read_text().splitlines()][-2:] == [("final", 1), ("final", 1)]
    res = glue_full("final", *args, tmp=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "final: 2 new run(s)" in res.stdout
    records = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert sorted((r["phase"], r["mode"], r["seed"]) for r in records) == [
        ("final", "full", 0), ("final", "full", 1), ("final", "off", 0), ("final", "off", 1),
        ("lr", "off", 0), ("tune", "full", 0), ("tune", "off", 0)]
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["task"] == "cola" and r["metric_name"] == "matthews"
        assert -1.0 <= r["metric"] <= 1.0 and r["lr"] == 5e-3 and r["epochs"] == 2
        assert r["fp_distance"] >= 0 and r["output_grad_norm"] > 0 and r["wall_s"] > 0
        assert r["steps"] == r["epochs"] * (r["train_rows"] // 16)
        assert (r["sigma"], r["lam"]) == ((0.0, 0.0) if r["mode"] == "off" else (1.0, 0.5))
        final = r["phase"] == "final"
        assert r["split"] == ("dev" if final else "heldout")
        assert (r["train_rows"], r["eval_rows"]) == ((200, 100) if final else (160, 40))
    curve = next(r["curve"] for r in records if r["phase"] == "lr")
    assert [c["epoch"] for c in curve] == [1, 2]  # one held-out eval per epoch
    finals = [r for r in records if r["phase"] == "final"]
    assert len({r["fp_distance"] for r in finals}) == 4  # seeds and modes differ

    # a second invocation finds every run recorded and starts none
    again = glue_full("all", *args, tmp=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "all: 0 new run(s)" in again.stdout
    assert len(results.read_text().splitlines()) == len(records)

    # the report (printed after the runs): the paired-difference table with its t-interval
    text = again.stdout
    assert "### Paired differences, mode − off at the same seed" in text
    paired = [ln for ln in text.splitlines() if ln.startswith("| cola | full | ") and "/2 |" in ln]
    assert len(paired) == 1, text
    by = {(r["mode"], r["seed"]): 100 * r["metric"] for r in finals}
    diffs = [by["full", s] - by["off", s] for s in (0, 1)]
    cells = [c.strip() for c in paired[0].split("|")]
    assert cells[3] == ", ".join(f"{d:+.2f}" for d in diffs)
    assert cells[4] == f"{(diffs[0] + diffs[1]) / 2:+.2f}"
    if diffs[0] != diffs[1]:  # df 1: mean ± 12.706 * sd / sqrt(2)
        half = 12.706 * abs(diffs[0] - diffs[1]) / 2
        lo, hi = (float(x) for x in cells[5].strip("[]").split(", "))
        assert abs(lo - (sum(diffs) / 2 - half)) < 0.02
        assert abs(hi - (sum(diffs) / 2 + half)) < 0.02
    assert cells[6] == f"{sum(d > 0 for d in diffs)}/2"
    assert "| cola | 0.005 (chosen) |" in text and "DRY RUN" in text
    assert "| cola full | λ 0.5 |" in text
