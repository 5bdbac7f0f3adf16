"""Chat templates for ``data.prompt_style: chat``: the tokenizer's own, a built-in, or a file.

``data.chat_template`` picks the Jinja template conversations are rendered with:

- unset (or ``tokenizer``): the tokenizer's own; a tokenizer without one gets pace_llm's
  :data:`DEFAULT_CHAT_TEMPLATE` (``### User:`` / ``### Assistant:``), with a warning;
- a built-in name, written from each family's published chat format (:data:`BUILTINS`):
  ``chatml``, ``llama-3``, ``mistral``, ``phi-3``, ``gemma``, ``qwen``;
- a path to a Jinja file (UTF-8), checked on load by rendering a two-turn conversation.

The built-ins are rendered exactly as the tokenizer's own template would be (transformers'
sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, ``bos_token``/``eos_token`` from the
tokenizer) and each supports ``add_generation_prompt``. They are *prefix-consistent*
(rendering a longer conversation never changes the text of a shorter one), which is how
:func:`pace_llm.data.tokens.chat_segments` finds the assistant spans without generation
markers; so they leave out the published templates' parts that are not:

- ``phi-3``: the published template appends ``eos_token`` when no generation prompt is asked
  for; here it does not (pace_llm appends EOS to the last assistant turn itself);
- ``mistral`` and ``gemma`` have no system role; a system message is put before the first
  user message, followed by a blank line (as Mistral's later and Gemma 3's templates do), and
  the published templates' role-alternation checks are left out;
- ``llama-3`` is Llama 3's (``<|begin_of_text|>`` is the tokenizer's ``bos_token``); Llama 3.1+'s
  date-stamped system preamble and tool calls are not included;
- ``qwen`` is Qwen2.5's: ChatML, and when the conversation has no system message it adds
  Qwen2.5's default one ("You are Qwen, created by Alibaba Cloud. You are a helpful
  assistant."), as Qwen2.5's published template does (Qwen2's used "You are a helpful
  assistant."; a Qwen tokenizer's own template is the exact one, and the default). Tool calls
  are not included. ``chatml`` is the same layout with no default system message.

A built-in's special tokens (``<|im_start|>``, ``<start_of_turn>``, ...) that the tokenizer's
vocabulary lacks still render, as text: tokenization then splits them into ordinary pieces.
That trains and serves consistently, but costs tokens and is not what the family's own models
saw, so it is logged once as a warning. Masking does not depend on the template: assistant
turns plus their end of turn are supervised (see :mod:`pace_llm.data.tokens`).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pace_llm.data.sources import looks_like_path
from pace_llm.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER = "tokenizer"
"""``data.chat_template`` value meaning the tokenizer's own template (as is unset)."""
KEY = "data.chat_template"

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)
"""pace_llm's plain chat layout, used for ``prompt_style: plain`` conversations and for
tokenizers without a chat template::

    <system>\\n\\n### User:\\n<user>\\n\\n### Assistant:\\n<assistant><eos>\\n\\n### User:\\n...
"""

CHATML = r"""
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message."""

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

QWEN = r"""
{%- if messages and messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>system\n""" + QWEN_DEFAULT_SYSTEM + r"""<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if not (loop.first and message['role'] == 'system') %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
"""Qwen2.5: ChatML, with Qwen2.5's default system message when the conversation has none."""

LLAMA_3 = r"""
{%- for message in messages %}
{%- if loop.first %}
{{- bos_token }}
{%- endif %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
"""Llama 3: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n
{content}<|eot_id|>`` per message (content trimmed)."""

MISTRAL = r"""
{%- if messages and messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] + '\n\n' %}
{%- set turns = messages[1:] %}
{%- else %}
{%- set system = '' %}
{%- set turns = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in turns %}
{%- if message['role'] == 'user' %}
{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
{%- elif message['role'] == 'assistant' %}
{{- message['content'] + eos_token }}
{%- endif %}
{%- endfor %}
"""
"""Mistral (v0.2 instruct): ``<s>[INST] {user} [/INST]{assistant}</s>[INST] ...``. The
generation prompt is ``[/INST]`` itself, so ``add_generation_prompt`` adds nothing."""

PHI_3 = r"""
{%- for message in messages %}
{%- if message['role'] == 'system' and message['content'] %}
{{- '<|system|>\n' + message['content'] + '<|end|>\n' }}
{%- elif message['role'] == 'user' %}
{{- '<|user|>\n' + message['content'] + '<|end|>\n' }}
{%- elif message['role'] == 'assistant' %}
{{- '<|assistant|>\n' + message['content'] + '<|end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|assistant|>\n' }}
{%- endif %}
"""
"""Phi-3: ``<|{role}|>\\n{content}<|end|>\\n`` per message."""

GEMMA = r"""
{%- if messages and messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] | trim + '\n\n' %}
{%- set turns = messages[1:] %}
{%- else %}
{%- set system = '' %}
{%- set turns = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in turns %}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
{{- '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<start_of_turn>model\n' }}
{%- endif %}
"""
"""Gemma: ``<bos><start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n...``
(content trimmed; the assistant's role is ``model``)."""


@dataclass(frozen=True)
class Builtin:
    """A named template and the special tokens it expects in the vocabulary."""

    text: str
    markers: tuple[str, ...]


BUILTINS: dict[str, Builtin] = {
    "chatml": Builtin(CHATML, ("<|im_start|>", "<|im_end|>")),
    "llama-3": Builtin(LLAMA_3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mistral": Builtin(MISTRAL, ()),  # [INST] is plain text in Mistral's original vocabulary
    "phi-3": Builtin(PHI_3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "gemma": Builtin(GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "qwen": Builtin(QWEN, ("<|im_start|>", "<|im_end|>")),
}
"""The built-in templates by ``data.chat_template`` name."""

JINJA_SUFFIXES = (".jinja", ".jinja2", ".j2")
PROBE = [{"role": "user", "content": "PROBE-USER-1"},
         {"role": "assistant", "content": "PROBE-ASSISTANT-1"},
         {"role": "user", "content": "PROBE-USER-2"},
         {"role": "assistant", "content": "PROBE-ASSISTANT-2"}]
"""The two-turn conversation a template file must render (no system message: some families'
templates refuse one)."""


def is_tokenizer_own(name_or_path: str | None) -> bool:
    """Whether ``data.chat_template`` means the tokenizer's own template."""
    return name_or_path is None or name_or_path == TOKENIZER


def describe(name_or_path: str | None) -> str:
    """The template choice in words (for data-check)."""
    if is_tokenizer_own(name_or_path):
        return "the tokenizer's own"
    if name_or_path.lower() in BUILTINS:
        return f"{name_or_path.lower()} (built-in)"
    return f"file {name_or_path}"


def resolve(name_or_path: str | None, tokenizer: Any) -> str:
    """The template text for ``data.chat_template``.

    None / ``"tokenizer"``: the tokenizer's own; a tokenizer without one gets
    :data:`DEFAULT_CHAT_TEMPLATE` set on it (so an exported tokenizer serves with the layout it
    was trained on), with a warning. A built-in name (case-insensitive): that template, with a
    warning if its special tokens are not single tokens of the vocabulary. Anything else is a
    path to a Jinja file, read as UTF-8 and rendered once on a two-turn conversation. A bad
    name or file raises UserError.
    """
    if is_tokenizer_own(name_or_path):
        if not getattr(tokenizer, "chat_template", None):
            log.warning("the tokenizer has no chat template; setting pace_llm's default template "
                        "(### User: / ### Assistant:, EOS after each assistant turn)")
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        return tokenizer.chat_template
    builtin = BUILTINS.get(name_or_path.lower())
    if builtin is not None:
        _warn_missing_markers(name_or_path.lower(), builtin.markers, tokenizer)
        return builtin.text
    if "/" not in name_or_path and not looks_like_path(name_or_path, JINJA_SUFFIXES):
        raise UserError(_unknown_name(name_or_path))
    return _load_file(Path(name_or_path).expanduser(), tokenizer)


def _unknown_name(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), [*BUILTINS, TOKENIZER], n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (f"{KEY}: unknown template '{name}'{hint}; give a built-in name "
            f"({', '.join(BUILTINS)}), '{TOKENIZER}' (the tokenizer's own, the default), or "
            "the path of a Jinja file (a name with a '/' or ending in .jinja)")


def _warn_missing_markers(name: str, markers: tuple[str, ...], tokenizer: Any) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = []
    for marker in markers:
        ids = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
        if len(ids) != 1 or (unk is not None and ids[0] == unk):
            missing.append(marker)
    if missing:
        log.warning("%s '%s': the tokenizer's vocabulary has no single token for %s; they are "
                    "rendered as text and split into ordinary tokens (this trains and serves "
                    "consistently but is not the layout the family's models were tuned on)",
                    KEY, name, ", ".join(missing))


def name_problem(name_or_path: str | None, key: str = KEY) -> str | None:
    """What is wrong with a ``data.chat_template`` value, found without a tokenizer (None: a
    built-in, the tokenizer's own, or a UTF-8 Jinja file that parses): the recipe's checks
    report it with every other problem, before anything loads. Rendering it on a conversation
    needs the tokenizer (:func:`resolve`)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if is_tokenizer_own(name_or_path) or name_or_path.lower() in BUILTINS:
        return None
    try:
        if "/" not in name_or_path and not looks_like_path(name_or_path, JINJA_SUFFIXES):
            raise UserError(_unknown_name(name_or_path))
        path = Path(name_or_path).expanduser()
        text = _read_file(path)
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(text)
    except UserError as exc:
        return str(exc).replace(KEY, key, 1)
    except TemplateSyntaxError as exc:
        return (f"{key}: '{path}' line {exc.lineno}: the Jinja template does not parse: "
                f"{exc.message}")
    return None


def _read_file(path: Path) -> str:
    if not path.exists():
        resolved = "" if path.is_absolute() else f" (resolved: {path.absolute()})"
        raise UserError(f"{KEY}: '{path}' is not a built-in name and no such file exists"
                        f"{resolved}; built-in names: {', '.join(BUILTINS)}")
    if not path.is_file():
        raise UserError(f"{KEY}: '{path}' is a directory; give a Jinja template file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{KEY}: '{path}' is not UTF-8 text ({exc.reason} at byte "
                        f"{exc.start}); save the template as UTF-8") from None


def _load_file(path: Path, tokenizer: Any) -> str:
    text = _read_file(path)
    check(text, tokenizer, str(path))
    return text


def check(text: str, tokenizer: Any, where: str) -> None:
    """Render :data:`PROBE` (with and without a generation prompt) through the tokenizer, as
    training will; a template that does not parse, raises, or drops the messages' text raises
    UserError naming ``where`` and the template line."""
    from jinja2 import TemplateSyntaxError

    if not text.strip():
        raise UserError(f"{KEY}: '{where}' is empty; a chat template must render each "
                        "message's content")
    for generation, messages in ((False, PROBE), (True, PROBE[:3])):
        try:
            rendered = tokenizer.apply_chat_template(messages, chat_template=text, tokenize=False,
                                                     add_generation_prompt=generation)
        except TemplateSyntaxError as exc:
            raise UserError(f"{KEY}: '{where}' line {exc.lineno}: the Jinja template does not "
                            f"parse: {exc.message}") from None
        except Exception as exc:  # noqa: BLE001 - any failure of user template code is theirs
            line = _template_line(exc.__traceback__)
            at = f" line {line}" if line else ""
            raise UserError(f"{KEY}: '{where}'{at}: the template fails on a two-turn "
                            f"conversation (user, assistant, user, assistant): "
                            f"{type(exc).__name__}: {exc}") from None
        absent = [m["content"] for m in messages if m["content"] not in rendered]
        if absent:
            raise UserError(f"{KEY}: '{where}' renders a two-turn conversation without the text "
                            f"of {len(absent)} of its {len(messages)} messages (got "
                            f"{rendered[:120]!r}); a chat template must render each "
                            "message['content']")


def _template_line(tb: TracebackType | None) -> int | None:
    """The template line of the innermost frame Jinja attributes to the template source."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
