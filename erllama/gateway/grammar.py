"""Grammars for structured replies: a JSON object, or JSON matching a JSON schema.

The GBNF text comes from llama-cpp-python's ``llama_grammar`` (its ``JSON_GBNF`` and its
port of llama.cpp's ``json_schema_to_gbnf``), imported on first use only: it loads the
llama library, which the gateway otherwise never needs.
"""

from __future__ import annotations

import json
from typing import Any

from erllama.gateway.errors import bad


def json_object() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def json_schema(schema: dict[str, Any]) -> str:
    """The GBNF of a JSON schema (400 ``badarg`` when the converter refuses it)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises plain exceptions on what it cannot map
        raise bad(
            f"json_schema cannot be turned into a grammar: {exc}", "response_format"
        ) from None


def for_response_format(kind: str, spec: dict[str, Any] | None) -> str | None:
    """The grammar of OpenAI's ``response_format`` (None for ``text``)."""
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        schema = (spec or {}).get("schema")
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be an object", "response_format")
        return json_schema(schema)
    raise bad(f"response_format type {kind!r} is not supported", "response_format")
