"""Chat templates (workers/chat.py): validation, the system/tools fold, jinja rendering, BOS,
errors, and the op through the engine on the stub backend."""

from __future__ import annotations

from typing import Any

import pytest

from erllama.protocol.codec import decode_result
from erllama.protocol.errors import ErllamaError, ErrorCode
from erllama.protocol.messages import ApplyChatTemplate, ErrorReply, Reply
from erllama.protocol.tokens import unpack_tokens
from erllama.workers import chat
from erllama.workers.chat import ChatTemplate, fold_system, validate_messages, validate_tools
from erllama.workers.stub import BOS, BYTE_OFFSET

from .fakes import Harness

pytestmark = pytest.mark.timeout(30)

USER = [{"role": "user", "content": "hi"}]


class FakeChat:
    """A chat backend over a given template: one token per character, BOS = 1000."""

    BOS_ID = 1000

    def __init__(self, template: str | None, *, adds_bos: bool = True) -> None:
        self.template = template
        self.adds_bos = adds_bos
        self.tokenized: list[tuple[str, bool, bool]] = []
        self.fail_tokenize: Exception | None = None

    def chat_template(self) -> str | None:
        return self.template

    def chat_special_tokens(self) -> tuple[str, str, int | None]:
        return "<bos>", "<eos>", self.BOS_ID if self.adds_bos else None

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        self.tokenized.append((text, add_special, parse_special))
        if self.fail_tokenize is not None:
            raise self.fail_tokenize
        out = [self.BOS_ID] if add_special and self.adds_bos else []
        rest = text
        while rest:
            if parse_special and rest.startswith("<bos>"):
                out.append(self.BOS_ID)
                rest = rest[5:]
            else:
                out.append(ord(rest[0]))
                rest = rest[1:]
        return out


def code(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ErllamaError) as ei:
        fn(*args, **kwargs)
    return ei.value.code


# ================================================================ validation and fold
def test_validate_messages() -> None:
    assert validate_messages(USER) == USER
    assert validate_messages([{"role": "user", "content": "x", "name": "n"}]) == [
        {"role": "user", "content": "x"}
    ]
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert code(validate_messages, blocks) == ErrorCode.INVALID_CONTENT
    assert code(validate_messages, [{"role": "user", "content": None}]) == "invalid_content"
    assert code(validate_messages, [{"role": 1, "content": "x"}]) == "invalid_content"
    assert code(validate_messages, [{"role": None, "content": "x"}]) == "invalid_content"
    assert code(validate_messages, [{"role": "user"}]) == ErrorCode.BADARG
    assert code(validate_messages, ["user: hi"]) == "badarg"
    assert code(validate_messages, "hi") == "badarg"


def test_validate_tools() -> None:
    assert validate_tools(None) == []
    tools = [{"name": "f", "description": "does f", "schema": {"type": "object"}}, {"name": "g"}]
    assert validate_tools(tools) == [("f", "does f"), ("g", "")]
    assert code(validate_tools, [{"description": "x"}]) == "badarg"
    assert code(validate_tools, [{"name": 3}]) == "badarg"
    assert code(validate_tools, [{"name": "f", "description": 1}]) == "badarg"
    assert code(validate_tools, ["f"]) == "badarg"
    assert code(validate_tools, "f") == "badarg"


def test_fold_system_and_tools_into_one_leading_message() -> None:
    tools = [("get_time", "Current time"), ("add", "Adds")]
    assert fold_system(USER, None, []) == USER
    assert fold_system(USER, "", []) == USER
    assert fold_system(USER, "Be brief.", []) == [
        {"role": "system", "content": "Be brief."},
        *USER,
    ]
    listing = "Available tools:\n  - get_time: Current time\n  - add: Adds"
    assert fold_system(USER, "Be brief.", tools)[0] == {
        "role": "system",
        "content": "Be brief.\n\n" + listing,
    }
    assert fold_system(USER, None, tools)[0] == {"role": "system", "content": listing}
    # an existing leading system message gets the folded text in front: still one
    msgs = [{"role": "system", "content": "Old."}, *USER]
    assert fold_system(msgs, "New.", []) == [{"role": "system", "content": "New.\n\nOld."}, *USER]
    assert code(fold_system, USER, 5, []) == "badarg"


# ================================================================ rendering
SIMPLE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_render_with_variables_and_generation_prompt() -> None:
    t = ChatTemplate(FakeChat(SIMPLE))
    assert t.render(USER, system="S") == "<bos>[system]S\n[user]hi\n[assistant]"
    eos = ChatTemplate(FakeChat("{{ eos_token }}|{{ messages | tojson }}"))
    assert eos.render([{"role": "user", "content": "é"}]) == (
        '<eos>|[{"role": "user", "content": "é"}]'
    )


def test_apply_tokenizes_with_specials_and_one_bos() -> None:
    backend = FakeChat(SIMPLE)
    toks = ChatTemplate(backend).apply(USER)
    assert backend.tokenized[-1][1:] == (True, True)  # add_special, parse_special
    assert toks[0] == FakeChat.BOS_ID and toks[1] != FakeChat.BOS_ID  # the doubled BOS collapsed
    assert toks[1:] == [ord(ch) for ch in "[user]hi\n[assistant]"]
    # a template without its own BOS keeps the tokenizer's one
    toks2 = ChatTemplate(FakeChat(SIMPLE.replace("{{ bos_token }}", ""))).apply(USER)
    assert toks2 == toks
    # a vocabulary that adds no BOS: the template's BOS stays
    no_bos = ChatTemplate(FakeChat(SIMPLE, adds_bos=False)).apply(USER)
    assert no_bos == toks


def test_template_errors() -> None:
    raising = "{{ raise_exception('roles must alternate') }}"
    assert code(ChatTemplate(FakeChat(raising)).apply, USER) == ErrorCode.TEMPLATE_FAILED
    with pytest.raises(ErllamaError, match="roles must alternate"):
        ChatTemplate(FakeChat(raising)).apply(USER)
    broken = ChatTemplate(FakeChat("{% for m in messages %}"))
    assert code(broken.apply, USER) == "template_failed"
    assert code(broken.apply, USER) == "template_failed"  # the compile error is remembered
    assert code(ChatTemplate(FakeChat("{{ messages[0].nope.deeper }}")).apply, USER) == (
        "template_failed"
    )
    assert code(ChatTemplate(FakeChat("{{ 1 + 'a' }}")).apply, USER) == "template_failed"
    # the sandbox: no mutation of the messages, no dunder access
    assert code(ChatTemplate(FakeChat("{{ messages.append(1) }}")).apply, USER) == (
        "template_failed"
    )
    assert code(ChatTemplate(FakeChat(None)).apply, USER) == ErrorCode.NO_TEMPLATE
    assert code(ChatTemplate(FakeChat("")).apply, USER) == "no_template"
    assert code(ChatTemplate(object()).apply, USER) == ErrorCode.NOT_SUPPORTED


def test_validation_runs_before_the_template() -> None:
    # a bad request is badarg / invalid_content even on a model without a template
    no_tmpl = ChatTemplate(FakeChat(None))
    assert code(no_tmpl.apply, [{"role": "user", "content": 5}]) == "invalid_content"


def test_too_large_and_tokenize_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "MAX_RENDERED_CHARS", 10)
    assert code(ChatTemplate(FakeChat(SIMPLE)).apply, USER) == ErrorCode.TOO_LARGE
    monkeypatch.undo()
    backend = FakeChat(SIMPLE)
    backend.fail_tokenize = RuntimeError("boom")
    assert code(ChatTemplate(backend).apply, USER) == ErrorCode.TOKENIZE_FAILED


# ================================================================ through the engine (stub)
def send_chat(h: Harness, rid: str, messages: list[Any], **kw: Any) -> None:
    h.send(ApplyChatTemplate(request_id=rid, model="m", messages=messages, **kw))


def test_engine_stub_fallback_template() -> None:
    h = Harness()
    tools = [{"name": "f", "description": "d", "schema": {}}]
    send_chat(h, "c1", [{"role": "user", "content": "hi"}], system="S", tools=tools)
    h.run()
    (msg,) = h.for_request("c1")
    assert isinstance(msg, Reply)
    toks = unpack_tokens(decode_result(msg.result, bytes))
    text = "system: S\n\nAvailable tools:\n  - f: d\nuser: hi\nassistant:"
    assert toks == [BOS] + [b + BYTE_OFFSET for b in text.encode()]


def test_engine_bad_chat_never_kills_the_worker() -> None:
    h = Harness()
    send_chat(h, "bad1", [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    send_chat(h, "bad2", [{"role": 3, "content": "x"}])
    send_chat(h, "bad3", [{"content": "x"}])
    h.complete("after", "hello", response_tokens=3)
    h.run()
    for rid, want in (("bad1", "invalid_content"), ("bad2", "invalid_content"), ("bad3", "badarg")):
        (msg,) = h.for_request(rid)
        assert isinstance(msg, ErrorReply) and msg.code == want, msg
    assert h.result("after").committed_tokens == 9
