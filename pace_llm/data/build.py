"""A recipe's data section -> TaskData: the task's spec, then the cache, the stream or a mixture.

The engine calls :func:`build_task` once: the task definition named by ``data.task``
(:data:`pace_llm.tasks.MODULES`) gives its :class:`~pace_llm.data.spec.TaskSpec`, which
:mod:`pace_llm.data.cache` runs once per data/tokenizer/settings key and stores as Arrow (every
rank then memory-maps it), or :mod:`pace_llm.data.stream` reads as consumed
(``data.streaming``); ``data.mix`` builds each source so and concatenates them
(:mod:`pace_llm.data.mix`). :func:`build_lists` runs the same row -> example functions in one
loop (no cache). :func:`task_texts` gives the raw text an offline base (``model.build``) trains
its tokenizer on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pace_llm.data import cache, mix, stream
from pace_llm.data.examples import ListExamples, TaskData
from pace_llm.data.length import LengthPolicy
from pace_llm.data.spec import TaskSpec, split_records
from pace_llm.data.tokens import renders_chat
from pace_llm.tasks import MODULES

if TYPE_CHECKING:
    from pace_llm.schema import DataArgs


def task_spec(data: DataArgs, tokenizer: Any) -> TaskSpec:
    """The spec of ``data.task`` (its checks run; a chat template is set on the tokenizer)."""
    return MODULES[data.task].task_spec(data, tokenizer)


def build_task(data: DataArgs, tokenizer: Any) -> TaskData:
    """Read, tokenize and check the task's data through the task cache (tokenized once, then
    memory-mapped by every rank), or as a stream (``data.streaming``), or each source of a
    mixture (``data.mix``); bad data raises UserError naming file and row."""
    if data.mix:
        return mix.build(data, tokenizer, build_task)
    spec = task_spec(data, tokenizer)
    if data.streaming:
        return stream.build(spec, data, tokenizer)
    return cache.build(spec, data, tokenizer)


def build_lists(data: DataArgs, tokenizer: Any) -> TaskData:
    """The task as Python lists, every row tokenized here in one loop (no cache, one process)."""
    spec = task_spec(data, tokenizer)
    splits = spec.read()
    train_records, eval_records = split_records(splits, list(splits.train))
    policy = LengthPolicy(data.max_length, data.on_too_long, splits.source)
    train = ListExamples(e for e in spec.train_fn(tokenizer, spec.ctx, list(train_records), policy)
                         if e is not None)
    stats = policy.finish()
    return spec.task(train, spec.eval_fn(tokenizer, spec.ctx, eval_records), stats,
                     {name: spec.eval_fn(tokenizer, spec.ctx, read())
                      for name, read in splits.extra.items()})


def renders_conversations(data: DataArgs) -> bool:
    """Whether the task (a mixture: any source) renders its rows with a chat template: the
    instruct task always (``plain``: pace_llm's layout), GSM8K-format tasks with
    ``prompt_style: chat``."""
    sources = mix.source_args(data) if data.mix else [data]
    return any(renders_chat(s.task, s.prompt_style) for s in sources)


def trained_template(data: DataArgs, tokenizer: Any) -> str | None:
    """The chat template the task's conversations were rendered with (set on the tokenizer by
    :func:`task_spec`), or None when no row was rendered with one (a mixture's sources render
    with one template: :func:`pace_llm.data.checks.mix_problems`)."""
    return tokenizer.chat_template if renders_conversations(data) else None


def task_texts(data: DataArgs) -> list[str]:
    """The task's training text (prompts and targets as rendered), to train a tokenizer on; a
    progress bar shows once it takes more than two seconds."""
    from tqdm import tqdm

    if data.mix:
        return [text for source in mix.source_args(data) for text in task_texts(source)]
    rows = MODULES[data.task].texts(data)
    return list(tqdm(rows, desc=f"model.build: rendering the {data.task} rows", unit=" rows",
                     delay=2, leave=False, dynamic_ncols=True))
