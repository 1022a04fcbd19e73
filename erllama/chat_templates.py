"""Which chat template a model renders with: the per-model ``chat_template`` option.

The option (``ModelSpec.chat_template``) takes one of:

* unset (the default): the GGUF's own ``tokenizer.chat_template``; a GGUF without one
  gets the built-in template of its architecture (``general.architecture``) when
  erllama has one (``FAMILY_TEMPLATES``: ``gemma3``, which covers the bundled Gemma 3
  270M, whose GGUF carries no template). Any other GGUF without a template answers
  ``no_template``.
* ``"gguf"``: the GGUF's own template only (never a built-in).
* a built-in name (``BUILTIN_TEMPLATES``: ``"gemma3"``).
* a jinja template string (it contains ``{{`` or ``{%``).
* otherwise a path to a file holding a jinja template (``~`` expanded), read when the
  worker loads; a missing or unreadable file fails the load (and is refused at
  ``load_model`` by ``erllama.config.validate_model_spec``).

``resolve`` gives the template source and where it came from (``ModelInfo.chat_template``
reports it: ``gguf``, ``builtin:gemma3``, ``file:<path>``, ``inline``, or empty for none).
Rendering itself (jinja sandbox, special tokens) is ``workers/chat.py``. This module sits
beside ``config`` (no erllama imports) because the root validates the option too.
"""

from __future__ import annotations

import os
from pathlib import Path

# Gemma 3's template (the instruction-tuned models' tokenizer_config.json), text contents
# only: the bundled 270M model has no vision tower.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

BUILTIN_TEMPLATES: dict[str, str] = {"gemma3": GEMMA3_CHAT_TEMPLATE}
GGUF = "gguf"
# general.architecture -> the built-in template a GGUF without its own gets.
FAMILY_TEMPLATES: dict[str, str] = {"gemma3": "gemma3"}
MAX_TEMPLATE_FILE_BYTES = 1 << 20


def is_inline(option: str) -> bool:
    """A template string rather than a name or a path."""
    return "{{" in option or "{%" in option


def check_option(option: str | None) -> None:
    """Refuse an option that names no built-in, no template and no readable file.

    Raises:
        ValueError: naming the option and the built-ins.
    """
    if option is None or option == GGUF or option in BUILTIN_TEMPLATES or is_inline(option):
        return
    read_file(option)


def read_file(option: str) -> str:
    """The template in file ``option``.

    Raises:
        ValueError: missing, unreadable, over 1 MiB or not UTF-8.
    """
    path = Path(os.path.expanduser(option))
    names = ", ".join(sorted(BUILTIN_TEMPLATES))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"chat_template: {option!r} is no built-in template ({names}), no template "
            f"string and no readable file: {exc.strerror or exc}"
        ) from None
    if len(data) > MAX_TEMPLATE_FILE_BYTES:
        raise ValueError(f"chat_template: {path} is over {MAX_TEMPLATE_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"chat_template: {path} is not UTF-8 text") from None


def resolve(
    option: str | None, gguf_template: str | None, *, architecture: str | None
) -> tuple[str, str]:
    """``(source, origin)`` of a model's chat template; ``("", "")`` when it has none.

    Args:
        option: ``ModelSpec.chat_template``.
        gguf_template: the GGUF's own template (None or empty when it carries none).
        architecture: the GGUF's ``general.architecture`` (None when unknown).

    Raises:
        ValueError: a file that cannot be read.
    """
    if option is None:
        if gguf_template:
            return gguf_template, GGUF
        family = FAMILY_TEMPLATES.get(architecture or "")
        if family is not None:
            return BUILTIN_TEMPLATES[family], f"builtin:{family}"
        return "", ""
    if option == GGUF:
        return (gguf_template, GGUF) if gguf_template else ("", "")
    if option in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[option], f"builtin:{option}"
    if is_inline(option):
        return option, "inline"
    return read_file(option), f"file:{os.path.expanduser(option)}"
