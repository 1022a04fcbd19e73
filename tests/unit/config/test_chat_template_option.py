"""The per-model ``chat_template`` option: which template a model renders with."""

from __future__ import annotations

from pathlib import Path

import pytest

from erllama import chat_templates
from erllama.config import ConfigError, convert_model_spec, default_config, validate_model_spec
from erllama.workers.chat import ChatTemplate
from erllama.workers.stub import STUB_CHAT_TEMPLATE, StubBackend

pytestmark = pytest.mark.timeout(30)
OWN = "{{ messages[0]['content'] }}!"


@pytest.mark.parametrize(
    ("option", "gguf", "arch", "expected"),
    [
        (None, OWN, "gemma3", (OWN, "gguf")),  # the GGUF's own wins
        (None, None, "gemma3", (chat_templates.GEMMA3_CHAT_TEMPLATE, "builtin:gemma3")),
        (None, "", "gemma3", (chat_templates.GEMMA3_CHAT_TEMPLATE, "builtin:gemma3")),
        (None, None, "llama", ("", "")),  # no template, no built-in for the family
        (None, None, None, ("", "")),
        ("gguf", None, "gemma3", ("", "")),  # the GGUF's only: never a built-in
        ("gguf", OWN, "gemma3", (OWN, "gguf")),
        ("gemma3", OWN, "llama", (chat_templates.GEMMA3_CHAT_TEMPLATE, "builtin:gemma3")),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", OWN, None,
         ("{% for m in messages %}{{ m.content }}{% endfor %}", "inline")),
    ],
)  # fmt: skip
def test_resolve(
    option: str | None, gguf: str | None, arch: str | None, expected: tuple[str, str]
) -> None:
    assert chat_templates.resolve(option, gguf, architecture=arch) == expected


def test_a_template_file_is_read(tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text(OWN, encoding="utf-8")
    assert chat_templates.resolve(str(f), None, architecture=None) == (OWN, f"file:{f}")


def test_a_bad_option_is_a_config_error_naming_the_builtins(tmp_path: Path) -> None:
    cache = default_config().cache
    for bad, why in [
        ("gemma-3", "no built-in template (gemma3)"),  # a typo of a name
        (str(tmp_path / "missing.jinja"), "no readable file"),
    ]:
        spec = convert_model_spec({"id": "m", "backend": "stub", "chat_template": bad})
        with pytest.raises(ConfigError, match="chat_template") as ei:
            validate_model_spec(spec, cache)
        assert why in str(ei.value)
    latin = tmp_path / "latin1.jinja"
    latin.write_bytes(b"\xff\xfe{{ x }}")
    spec = convert_model_spec({"id": "m", "backend": "stub", "chat_template": str(latin)})
    with pytest.raises(ConfigError, match="not UTF-8"):
        validate_model_spec(spec, cache)
    for ok in (None, "gguf", "gemma3", OWN):
        validate_model_spec(convert_model_spec({"id": "m", "backend": "stub",
                                                "chat_template": ok}), cache)  # fmt: skip


def test_the_stub_renders_the_configured_template() -> None:
    default = StubBackend(convert_model_spec({"id": "m", "backend": "stub"}))
    assert default.chat_template() == STUB_CHAT_TEMPLATE and default.info.chat_template == "stub"
    own = StubBackend(convert_model_spec({"id": "m", "backend": "stub", "chat_template": OWN}))
    assert own.info.chat_template == "inline"
    tokens = ChatTemplate(own).apply([{"role": "user", "content": "hey"}])
    assert own.detokenize(tokens[1:]) == "hey!"
