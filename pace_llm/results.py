"""What a run leaves: its adapter (PEFT format) of the current weights, early stopping's best
adapter (and which of the two is the result), the merged model, the curves.

Early stopping (``eval.patience``): each evaluation after step 0 either improves the task metric
(the new best) or counts one evaluation without gain; ``patience`` such evaluations in a row
before the last step stop the run (recorded in metrics.jsonl as ``early_stop``), and the best
evaluation's adapter becomes ``adapter/``. The best adapter is written at each new best: to
``adapter-best/`` when ``eval.save_best`` asks for it, else (patience alone) to the hidden
``.adapter-best/``, which is no result: an early stop moves it to ``adapter/``, a run that
reaches its last step removes it. (On disk rather than in memory: a resumed run still has it.)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pace_llm import distributed as D
from pace_llm.atomic import copy_dir
from pace_llm.dtypes import resolve
from pace_llm.export import export_adapter
from pace_llm.merge import merge_adapter_dir, merge_and_save
from pace_llm.model import TRAIN_CODE_FLAG, classifier_head
from pace_llm.plot import plot_metrics
from pace_llm.run import Run
from pace_llm.schema import recipe_to_dict
from pace_llm.vllm_contract import serve_command

BEST = "adapter-best"
"""eval.save_best: the best evaluation's adapter, a result the user asked for."""
KEPT = ".adapter-best"
"""eval.patience without save_best: the best adapter kept for an early stop, hidden."""


def write_adapter(run: Run, out_dir: Path, overwrite: bool = False, quiet: bool = False,
                  rescue: bool = False) -> None:
    """The PEFT-format adapter of the current weights (every rank calls; rank 0 writes).
    ``rescue`` (the final adapter): a filesystem that refuses it gets the adapter written to
    the system's temporary directory instead, named in the message (exit 2)."""
    export_adapter(run.model, out_dir, base_model_name_or_path=run.served_name,
                   task_type="CAUSAL_LM" if run.causal else "SEQ_CLS",
                   dtype=resolve(run.recipe.export.dtype, run.precision),
                   head_modules=[] if run.causal else classifier_head(run.model),
                   pace_info=recipe_to_dict(run.recipe), overwrite=overwrite,
                   chat_template=run.chat_template, rescue=rescue)
    if not quiet and D.is_main():
        print(f"[pace_llm] adapter written: {out_dir}", flush=True)


@dataclass
class EarlyStopping:
    """The best evaluation so far and the patience count (module docstring); checkpointed."""

    patience: int
    save_best: bool
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_gain: int = 0
    stopped: bool = False

    @property
    def keeps_best(self) -> bool:
        """Whether the best evaluation's adapter is written (asked for, or needed by patience)."""
        return self.save_best or bool(self.patience)

    def observe(self, step: int, metric: float | None, last: bool) -> str | None:
        """"best" (a new best metric), "stop" (patience ran out before the last step) or None."""
        if metric is None:
            return None
        if self.best_metric is None or metric > self.best_metric:
            self.best_metric, self.best_step, self.evals_without_gain = metric, step, 0
            return "best"
        self.evals_without_gain += 1
        if self.patience and self.evals_without_gain >= self.patience and not last:
            self.stopped = True
            return "stop"
        return None

    def stop_message(self, step: int, out: Path) -> str:
        return (f"early stop at step {step}: the task metric has not improved in "
                f"{self.patience} evaluation(s) (eval.patience); best {self.best_metric:.4g} at "
                f"step {self.best_step}, whose adapter becomes {out / 'adapter'}")

    def record(self) -> dict[str, Any]:
        """The ``early_stop`` record of metrics.jsonl."""
        return {"best_step": self.best_step, "best_metric": self.best_metric,
                "patience": self.patience, "evals_without_gain": self.evals_without_gain}

    def best_dir(self, out: Path) -> Path:
        """Where the best adapter is written: adapter-best/ (save_best), else .adapter-best/."""
        return out / (BEST if self.save_best else KEPT)

    def state(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_step": self.best_step,
                "evals_without_gain": self.evals_without_gain}

    def restore(self, state: dict[str, Any]) -> None:
        self.best_metric, self.best_step = state.get("best_metric"), state.get("best_step")
        self.evals_without_gain = state.get("evals_without_gain", 0)


def finish(run: Run, stopping: EarlyStopping, log: Any) -> None:
    """After the last step (or an early stop): the adapter (the best evaluation's after an early
    stop), the merged model if asked, the curves."""
    adapter, kept = run.out / "adapter", run.out / KEPT
    if stopping.stopped:
        D.on_rank0(lambda: copy_dir(stopping.best_dir(run.out), adapter))
    else:
        write_adapter(run, adapter, overwrite=True, rescue=True)
    if D.is_main() and kept.exists():  # no result: it was kept for an early stop
        shutil.rmtree(kept)
    if run.recipe.export.merge and stopping.stopped:  # the best adapter onto the base
        D.on_rank0(lambda: merge_adapter_dir(
            adapter, run.out / "merged", base=run.served_name, recipe=run.recipe, dtype=None,
            overwrite=True, trust_remote_code=run.recipe.model.trust_remote_code,
            flag=TRAIN_CODE_FLAG))
        log(f"merged model written: {run.out / 'merged'}")
    elif run.recipe.export.merge:
        merge_and_save(run.model, run.out / "merged", tokenizer=run.tokenizer, overwrite=True)
        log(f"merged model written: {run.out / 'merged'}")
    if D.is_main():
        plot_metrics(run.out / "metrics.jsonl", run.out / "curves.png")
        log(f"done: recipe {run.out / 'recipe.yaml'}, metrics {run.out / 'metrics.jsonl'}, "
            f"curves {run.out / 'curves.png'}, adapter {adapter}")
        log(next_steps(run, adapter))


def next_steps(run: Run, adapter: Path) -> str:
    """What to do with a finished run: look at the data as trained, merge, serve."""
    out = run.out
    merged = out.parent / f"{out.name}-merged"
    lines = ["next steps:",
             f"  pace-llm data-check --recipe {out / 'recipe.yaml'}    # one example as the model "
             "saw it, and the data's statistics",
             f"  pace-llm export --run {out} --out {merged} --merge    # a merged transformers "
             "model (with its tokenizer)"]
    if run.causal:
        lines.append(f"  {serve_command(adapter)}")
    else:
        lines.append(f"  PeftModel.from_pretrained(base, '{adapter}')    # vLLM serves no "
                     "classifier adapters: transformers + PEFT")
    return "\n".join(lines)
