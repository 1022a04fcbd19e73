"""Chat templates: ``apply_chat_template`` requests -> prompt tokens (REFERENCE §1.3).

The request is ``{messages: [{role, content}], system?, tools?: [{name, description,
schema}]}``. Steps:

1. Validate (D13: a bad request is an error reply, never a dead worker): every message
   must be a map with ``role`` and ``content``; a role or a content that is not a string
   (a list of content blocks, a number, ``None``) is ``invalid_content``; a message that is
   not a map, a missing key, or a tool without a string ``name`` is ``badarg``.
2. Fold ``system`` and ``tools`` into ONE leading system message: the system text, a blank
   line, ``Available tools:``, then one line ``  - name: description`` per tool (no blank
   line when there is no system text). When the messages already start with a system
   message, the folded text goes in front of its content, separated by a blank line, so
   there is still exactly one. Tool schemas are not rendered (upstream renders only the
   list), and the template gets no ``tools`` variable.
3. Render the model's template (the ``chat_template`` option resolved by
   ``erllama.chat_templates``: the GGUF's own, a built-in, a string or a file) in a jinja2
   ``ImmutableSandboxedEnvironment`` as llama-cpp-python's ``Jinja2ChatFormatter`` does:
   ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter
   that keeps non-ASCII, ``raise_exception``, ``strftime_now``, ``bos_token`` /
   ``eos_token`` and ``add_generation_prompt=True``. Any jinja error, including the
   template's own ``raise_exception`` (Gemma's "roles must alternate"), is
   ``template_failed``; a text over ``MAX_RENDERED_CHARS`` is ``too_large``.
4. Tokenize with ``add_special=True, parse_special=True``. Templates usually emit
   ``{{ bos_token }}`` themselves and the tokenizer adds one as well: a doubled BOS at the
   start is collapsed to one (llama.cpp's server keeps both and warns; two BOS change the
   model's output).

Backends: a backend renders chat when it has ``chat_template()`` and
``chat_special_tokens()`` (``ChatBackend``); otherwise ``not_supported``. A backend whose
``chat_template()`` is ``None`` or empty (no template resolved) is ``no_template``.
The stub backend has a documented fallback template (``stub.STUB_CHAT_TEMPLATE``: one
``role: content`` line per message, then ``assistant:``), rendered by this same code.

Alternatives turned down: ``llama_chat_apply_template`` (the C renderer) knows only a fixed
list of built-in templates and guesses which one by substring, so a custom template is
silently rendered as another; jinja2 runs the real template. Rendering on the IO thread:
templates are Python, they would hold the GIL against the socket loop; the engine runs
them between tokens like every other non-generation op.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from erllama.protocol.errors import (
    ErllamaError,
    ErrorCode,
    InvalidRequestError,
    NotSupportedError,
)
from erllama.protocol.messages import MAX_TEXT_LEN

MAX_RENDERED_CHARS = MAX_TEXT_LEN  # the same bound as a prompt text


@runtime_checkable
class ChatBackend(Protocol):
    """What a backend offers to render chats."""

    def chat_template(self) -> str | None:
        """The model's own chat template (jinja source), None when it has none."""
        ...

    def chat_special_tokens(self) -> tuple[str, str, int | None]:
        """``(bos_text, eos_text, bos_id)``; ``bos_id`` None when tokenize adds no BOS."""
        ...

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]: ...


def _badarg(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, code=ErrorCode.BADARG)


def _invalid(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, code=ErrorCode.INVALID_CONTENT)


def validate_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """Check the messages of a request; ``[{role, content}]`` with strings only.

    Raises:
        InvalidRequestError: ``badarg`` (not a list, a message that is not a map or lacks
            ``role`` / ``content``), ``invalid_content`` (a non-string role or content).
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise _badarg(f"messages must be a list, not {type(messages).__name__}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise _badarg(f"messages[{i}] must be a map with role and content")
        if "role" not in m or "content" not in m:
            raise _badarg(f"messages[{i}] needs both role and content")
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise _invalid(f"messages[{i}].role must be a string, not {type(role).__name__}")
        if not isinstance(content, str):
            raise _invalid(f"messages[{i}].content must be a string, not {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def validate_tools(tools: Sequence[Any] | None) -> list[tuple[str, str]]:
    """``(name, description)`` of each tool (schemas are accepted and not rendered).

    Raises:
        InvalidRequestError: ``badarg`` for a tool that is not a map, or a name or
            description that is not a string (a missing description is empty).
    """
    if tools is None:
        return []
    if isinstance(tools, str | bytes) or not isinstance(tools, Sequence):
        raise _badarg(f"tools must be a list, not {type(tools).__name__}")
    out: list[tuple[str, str]] = []
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping):
            raise _badarg(f"tools[{i}] must be a map with name, description and schema")
        name, desc = t.get("name"), t.get("description", "")
        if not isinstance(name, str) or not name:
            raise _badarg(f"tools[{i}].name must be a non-empty string")
        if not isinstance(desc, str):
            raise _badarg(f"tools[{i}].description must be a string")
        out.append((name, desc))
    return out


def fold_system(
    messages: list[dict[str, str]], system: str | None, tools: list[tuple[str, str]]
) -> list[dict[str, str]]:
    """Fold ``system`` and ``tools`` into one leading system message (module docstring)."""
    if system is not None and not isinstance(system, str):
        raise _badarg(f"system must be a string, not {type(system).__name__}")
    parts: list[str] = []
    if system:
        parts.append(system)
    if tools:
        parts.append("Available tools:\n" + "\n".join(f"  - {n}: {d}" for n, d in tools))
    if not parts:
        return messages
    text = "\n\n".join(parts)
    if messages and messages[0]["role"] == "system":
        first = messages[0]["content"]
        merged = f"{text}\n\n{first}" if first else text
        return [{"role": "system", "content": merged}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _raise_exception(message: str) -> None:
    raise _TemplateRaisedError(str(message))


class _TemplateRaisedError(Exception):
    """The template called ``raise_exception``."""


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_failed(message: str) -> NotSupportedError:
    return NotSupportedError(message, code=ErrorCode.TEMPLATE_FAILED)


class ChatTemplate:
    """The chat renderer of one worker; the template is compiled once, on first use.

    Args:
        backend: the model (``ChatBackend``, or anything else for ``not_supported``).
    """

    def __init__(self, backend: object) -> None:
        self._backend = backend
        self._compiled: Any = None
        self._error: ErllamaError | None = None

    def _template(self) -> Any:
        if self._compiled is not None:
            return self._compiled
        if self._error is not None:
            raise self._error
        backend = self._backend
        if not isinstance(backend, ChatBackend):
            raise NotSupportedError(
                "this backend cannot render chat templates", code=ErrorCode.NOT_SUPPORTED
            )
        source = backend.chat_template()
        if not source:
            raise NotSupportedError(
                "the model carries no chat template (GGUF key tokenizer.chat_template)",
                code=ErrorCode.NO_TEMPLATE,
            )
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        try:
            self._compiled = env.from_string(source)
        except jinja2.TemplateError as exc:
            self._error = _template_failed(f"the model's chat template does not compile: {exc}")
            raise self._error from None
        return self._compiled

    def render(
        self,
        messages: Sequence[Any],
        system: str | None = None,
        tools: Sequence[Any] | None = None,
    ) -> str:
        """The prompt text of a chat request (validated, folded, rendered).

        Raises:
            InvalidRequestError: ``badarg``, ``invalid_content``, ``too_large``.
            NotSupportedError: ``not_supported``, ``no_template``, ``template_failed``.
        """
        msgs = fold_system(validate_messages(messages), system, validate_tools(tools))
        template = self._template()
        backend = self._backend
        assert isinstance(backend, ChatBackend)
        bos_text, eos_text, _ = backend.chat_special_tokens()
        try:
            text = template.render(
                messages=msgs,
                bos_token=bos_text,
                eos_token=eos_text,
                add_generation_prompt=True,
                raise_exception=_raise_exception,
                strftime_now=_strftime_now,
            )
        except _TemplateRaisedError as exc:
            raise _template_failed(f"the chat template refused the request: {exc}") from None
        except Exception as exc:  # jinja errors, and whatever a template's own code raises
            raise _template_failed(
                f"the chat template failed: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(text, str):
            raise _template_failed("the chat template rendered no text")
        if len(text) > MAX_RENDERED_CHARS:
            raise InvalidRequestError(
                f"the rendered chat has {len(text)} characters, over {MAX_RENDERED_CHARS}",
                code=ErrorCode.TOO_LARGE,
            )
        return text

    def apply(
        self,
        messages: Sequence[Any],
        system: str | None = None,
        tools: Sequence[Any] | None = None,
    ) -> list[int]:
        """``apply_chat_template``: the prompt tokens of a chat request.

        Raises:
            InvalidRequestError: ``badarg``, ``invalid_content``, ``too_large``,
                ``tokenize_failed``.
            NotSupportedError: ``not_supported``, ``no_template``, ``template_failed``.
        """
        text = self.render(messages, system, tools)
        backend = self._backend
        assert isinstance(backend, ChatBackend)
        try:
            tokens = backend.tokenize(text, add_special=True, parse_special=True)
        except ErllamaError:
            raise
        except Exception as exc:
            raise InvalidRequestError(
                f"cannot tokenize the rendered chat: {exc}", code=ErrorCode.TOKENIZE_FAILED
            ) from None
        _, _, bos = backend.chat_special_tokens()
        if bos is not None and len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
            del tokens[0]  # the template's own BOS and the tokenizer's: keep one
        return tokens
