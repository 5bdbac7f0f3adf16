"""Tokenizer-side helpers shared by the task modules: BOS/EOS, chat templates, segments.

A causal example is built from *segments* of text, each tokenized on its own
(``add_special_tokens=False``; later segments as continuations, without a sentencepiece
word-start marker) and concatenated, so the boundary between what is and is not supervised
is exact and generation from the prompt ids sees exactly the training prefix. Chat
conversations are split into segments by rendering prefixes of the conversation with the
template: the assistant turn ``i`` is the text that
``render(messages[:i+1])`` adds to ``render(messages[:i], add_generation_prompt=True)``. No
generation markers (``{% generation %}``) are needed.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from pace_llm.data import templates
from pace_llm.data.examples import IGNORE
from pace_llm.data.templates import DEFAULT_CHAT_TEMPLATE  # re-exported
from pace_llm.errors import UserError
from pace_llm.schema import TASKS

log = logging.getLogger(__name__)

Segment = tuple[str, bool]  # (text, supervised)


def encode(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (special-token text is still parsed)."""
    return list(tok(text, add_special_tokens=False)["input_ids"])


def encode_continuation(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` as it reads *after* other text, not at the start of one.

    A sentencepiece tokenizer puts a word-start marker on the first word of every encoding
    (``"Hi"`` -> ``"▁Hi"``) which whole-text tokenization would not have mid-sequence. Encoding
    ``"\\n" + text`` and removing the ids of ``"\\n"`` avoids it; when the newline merges with
    the text (``"\\n\\n"``), plain :func:`encode` is used.
    """
    anchor = encode(tok, "\n")
    ids = encode(tok, "\n" + text)
    return ids[len(anchor):] if ids[:len(anchor)] == anchor else encode(tok, text)


def bos_prefix(tok: Any) -> list[int]:
    """The BOS id if this tokenizer adds one when encoding text, else []."""
    bos = tok.bos_token_id
    if bos is None:
        return []
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    return [bos] if with_special and with_special[0] == bos else []


def eos_id(tok: Any, what: str) -> int:
    """The EOS id; a causal task cannot train a stop without one."""
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer has no eos_token, which {what} needs to end each target; "
                        "use a tokenizer that defines one")
    return int(tok.eos_token_id)


def chat_template(tok: Any, prompt_style: str, name: str | None = None) -> str:
    """The template to render with: ``data.chat_template`` for ``chat``, pace_llm's for ``plain``.

    ``name`` is ``data.chat_template`` (see :func:`pace_llm.data.templates.resolve`). None
    means the tokenizer's own; a tokenizer without one gets :data:`DEFAULT_CHAT_TEMPLATE` set
    on it explicitly, with a log line. The template conversations are rendered with is set on
    the tokenizer (a built-in, a file, or for ``plain`` pace_llm's layout), so the tokenizer
    saved with the merged model, and the adapter's chat_template.jinja, serve the layout the
    model was trained on.
    """
    check_prompt_style(prompt_style, name)
    template = templates.resolve(name, tok)
    rendered = template if prompt_style == "chat" else DEFAULT_CHAT_TEMPLATE
    if tok.chat_template != rendered:
        what = templates.describe(name) if prompt_style == "chat" else "pace_llm's plain layout"
        log.info("chat template %s set on the tokenizer (what the conversations are rendered "
                 "with)", what)
        tok.chat_template = rendered
    return rendered


def check_prompt_style(prompt_style: str, name: str | None) -> None:
    """A chosen ``data.chat_template`` needs ``prompt_style: chat`` (plain would ignore it)."""
    problem = prompt_style_problem(prompt_style, name)
    if problem is not None:
        raise UserError(problem)


def renders_chat(task: str, prompt_style: str) -> bool:
    """Whether a (source's) task renders its rows with a chat template: the instruct task always
    (``plain``: pace_llm's layout), GSM8K-format tasks with ``prompt_style: chat``."""
    return task == "instruct" or (prompt_style == "chat" and TASKS.get(task) == "causal_lm")


def prompt_style_problem(prompt_style: str, name: str | None) -> str | None:
    """:func:`check_prompt_style`'s rule as a problem (the recipe's checks list it at parse
    time for a causal task)."""
    if prompt_style != "chat" and not templates.is_tokenizer_own(name):
        return (f"data.chat_template is {name!r} but data.prompt_style is {prompt_style!r}, "
                "which does not use a chat template; set data.prompt_style: chat, or remove "
                "data.chat_template")
    return None


def render(tok: Any, messages: list[dict[str, str]], template: str, generation: bool,
           where: str) -> str:
    """The template applied to ``messages`` as text; template errors name the row."""
    from jinja2 import TemplateError

    if not messages:
        return ""
    try:
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=generation)
    except TemplateError as exc:
        raise UserError(f"{where}: the chat template rejected this conversation: {exc}") from None


def chat_segments(tok: Any, messages: list[dict[str, str]], template: str,
                  where: str) -> list[Segment]:
    """Split a rendered conversation into (text, supervised) segments, assistant turns supervised.

    Raises UserError if the template is not prefix-consistent (rendering a longer conversation
    changes the text of a shorter one), since the supervised span cannot then be located.
    """
    segments: list[Segment] = []
    done = ""  # text covered so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise UserError(f"{where}: the conversation starts with an assistant turn; it needs "
                            "a user (or system) message before the first assistant reply")
        start = render(tok, messages[:i], template, True, where)
        end = render(tok, messages[: i + 1], template, False, where)
        if not start.startswith(done) or not end.startswith(start):
            raise UserError(f"{where}: the chat template is not prefix-consistent (rendering "
                            f"turn {i + 1} changes the text before it), so the assistant span "
                            "cannot be located; use data.prompt_style: plain")
        segments += [(start[len(done):], False), (end[len(start):], True)]
        done = end
    return [(text, sup) for text, sup in segments if text]


REPLY_PROBE = "PACE-LLM-REPLY-PROBE"
"""The assistant content :func:`reply_format` renders to find what surrounds a reply."""

Reply = dict[str, str]
"""``{"prefix": ..., "end": ...}``: how a chat template lays out an assistant reply after the
generation prompt (:func:`reply_format`); stored in each evaluation row as ``reply``."""


def reply_format(tok: Any, template: str, where: str = templates.KEY) -> Reply:
    """What surrounds an assistant reply in ``template``, found by rendering a one-turn probe.

    ``prefix``: the text between the generation prompt and the reply's content (a template
    whose generation prompt already opens the turn has none); ``end``: the text that closes the
    turn, whitespace stripped (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``,
    the EOS text; empty when nothing but EOS ends a reply). Generation stops at ``end`` (token
    or text) and the scored prediction is the content between the two (:func:`reply_text`).
    """
    messages = [{"role": "user", "content": "PACE-LLM-USER-PROBE"},
                {"role": "assistant", "content": REPLY_PROBE}]
    reply = next((text for text, sup in chat_segments(tok, messages, template, where) if sup), "")
    at = reply.find(REPLY_PROBE)
    if at < 0:  # the template rewrites the content: only EOS can end a reply
        return {"prefix": "", "end": ""}
    return {"prefix": reply[:at], "end": reply[at + len(REPLY_PROBE):].strip()}


def reply_text(tok: Any, ids: list[int], reply: Reply | None) -> str:
    """A generated reply as the metric scores it: its content only.

    Without a chat layout (``reply`` None) the ids are decoded without special tokens. With
    one, the text (special tokens kept, so that a marker that is a special token is seen) is
    cut at the first ``end`` (with the whitespace before it), the ``prefix`` is removed, then
    special tokens are dropped, so a marker that the vocabulary spells as ordinary text
    (``<|im_end|>`` on a tokenizer without it) is never part of a prediction.
    """
    if not reply:
        return tok.decode(ids, skip_special_tokens=True)
    text = tok.decode(ids, skip_special_tokens=False)
    end, prefix = reply.get("end", ""), reply.get("prefix", "")
    if end and end in text:  # the layout's whitespace before its end marker goes with it
        text = text[:text.index(end)].rstrip()
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    for special in tok.all_special_tokens:
        text = text.replace(special, "")
    return text


def supervised_ids(segment_ids: list[int], eos: int, last: bool) -> tuple[list[int], list[int]]:
    """Split an assistant segment into (supervised, unsupervised tail) around its EOS.

    If the segment contains EOS, supervision ends with the last EOS and what follows (a
    template's trailing newline) is not supervised. Otherwise EOS is appended to the last
    assistant turn, so the model always learns to stop.
    """
    if eos in segment_ids:
        cut = len(segment_ids) - segment_ids[::-1].index(eos)
        return segment_ids[:cut], segment_ids[cut:]
    return (segment_ids + [eos], []) if last else (segment_ids, [])


def segments_to_example(tok: Any, segments: list[Segment], eos: int) -> dict[str, list[int]]:
    """input_ids / labels (unshifted, -100 where not supervised) from text segments.

    The tokenizer's BOS is prepended unless the first segment's ids already start with it;
    trailing unsupervised tokens are dropped (nothing after the last EOS is trained or needed).
    """
    ids: list[int] = []
    labels: list[int] = []
    n_sup = sum(sup for _, sup in segments)
    seen = 0
    for text, sup in segments:
        piece = _piece(tok, text, first=not ids)
        if sup:
            seen += 1
            sup_ids, rest = supervised_ids(piece, eos, last=seen == n_sup)
            ids += sup_ids + rest
            labels += sup_ids + [IGNORE] * len(rest)
        else:
            ids += piece
            labels += [IGNORE] * len(piece)
    while labels and labels[-1] == IGNORE:
        labels.pop()
        ids.pop()
    return {"input_ids": ids, "labels": labels}


def generation_example(tok: Any, segments: list[Segment], eos: int, reference: str,
                       reply: Reply | None = None) -> dict[str, Any]:
    """An evaluation row from segments ending with the supervised answer.

    ``prompt_ids``: everything before the last segment, as fed to generation (identical to the
    training prefix); ``target_ids``: the last segment's ids exactly as trained (EOS included);
    ``reference``: the answer text the metric compares against; ``reply`` (a chat layout, see
    :func:`reply_format`): where generation stops and what of it is scored.
    """
    example = segments_to_example(tok, segments, eos)
    prompt: list[int] = []
    for text, _ in segments[:-1]:
        prompt += _piece(tok, text, first=not prompt)
    row = {"prompt_ids": prompt, "target_ids": example["input_ids"][len(prompt):],
           "reference": reference}
    if reply is not None:
        row["reply"] = reply
    return row


def _piece(tok: Any, text: str, first: bool) -> list[int]:
    """A segment's ids: the first starts the sequence (BOS as the tokenizer adds it, unless the
    text already renders it); later ones continue it."""
    if not first:
        return encode_continuation(tok, text)
    bos = bos_prefix(tok)
    piece = encode(tok, text)
    return piece if piece[:1] == bos else bos + piece


def render_default(messages: list[dict[str, str]], eos_token: str = "</s>") -> str:
    """:data:`DEFAULT_CHAT_TEMPLATE` rendered without a tokenizer (text for tokenizer training);
    the template is compiled once per process, not once per row."""
    return _default_template().render(messages=messages, eos_token=eos_token,
                                      add_generation_prompt=False)


@functools.cache
def _default_template() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(DEFAULT_CHAT_TEMPLATE)
