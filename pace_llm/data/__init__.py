"""The data pipeline, in the order a run goes through it (the task definitions are in
``pace_llm/tasks``):

- read: :mod:`~pace_llm.data.sources` (rows of local files or hub datasets, row-numbered
  errors), :mod:`~pace_llm.data.files` (the content hashes of the files read);
- tokenize: :mod:`~pace_llm.data.tokens` (segments -> ids and labels),
  :mod:`~pace_llm.data.templates` (chat templates), :mod:`~pace_llm.data.length` (the length
  policy, ``data.on_too_long``);
- store: :mod:`~pace_llm.data.cache` (tokenized once, Arrow, memory-mapped by every rank),
  :mod:`~pace_llm.data.stream` (read as consumed), :mod:`~pace_llm.data.mix` (several sources);
- order: :mod:`~pace_llm.data.batches` (the global batches of each step, their layout over
  ranks and accumulation steps);
- collate: :mod:`~pace_llm.data.collate` (padded tensors, supervised positions).

:mod:`~pace_llm.data.examples` declares what they hand around (the :class:`Examples` protocol,
TaskData); :mod:`~pace_llm.data.spec` what a task definition gives (TaskSpec, its rows as
Splits); :mod:`~pace_llm.data.build` is the entry (``build_task``);
:mod:`~pace_llm.data.checks` holds the data section's recipe checks.
"""
