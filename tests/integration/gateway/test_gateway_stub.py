"""The HTTP gateway with the official clients (``openai``, ``anthropic``, ``ollama``), stub models.

The stub backend renders chats with its fallback template (``role: content`` lines) and
"says" its ``script``; the real-model tests are ``tests/model/test_gateway_model.py``.
One daemon per module: the gateway on a free loopback port (``listen = 127.0.0.1:0``).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

import erllama
from tests.support.daemon import Daemon, stub_model, wait_until

pytestmark = pytest.mark.timeout(120)
SCRIPT = "The harbour is calm today and every berth is full of ships."
POLICY = {"min_tokens": 16, "cold_min_tokens": 16, "boundary_align_tokens": 16}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    models = [
        {**stub_model("m", script=SCRIPT), "policy": POLICY},
        {**stub_model("slow", script=SCRIPT * 20, token_delay_ms=20.0)},
        {
            **stub_model(
                "tools",
                script='<tool_call>{"name": "get_weather", '
                '"arguments": {"city": "Lisbon"}}</tool_call>',
            ),
            "tool_call_markers": {"start": "<tool_call>", "end": "</tool_call>"},
            # the prompt ends in "@" (not in the script): the stub says its script from the start
            "chat_template": "{% for m in messages %}{{ m.content }}\n{% endfor %}@",
        },
    ]
    config = {
        "models": models,
        "supervisor": {"heartbeat_interval_s": 1.0, "drain_timeout_s": 5.0, "term_timeout_s": 3.0},
        "http": {"listen": "127.0.0.1:0"},
    }
    d = Daemon(tmp_path_factory.mktemp("gw"), config, ready_timeout=60)
    try:
        yield d
    finally:
        d.teardown()


@pytest.fixture(scope="module")
def url(gw: Daemon) -> str:
    return gw.http_url()


@pytest.fixture(scope="module")
def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def long_question(n: int) -> str:
    return "Tell me about the harbour. " * n


# ================================================================ OpenAI
def test_openai_models_and_chat(oai: openai.OpenAI) -> None:
    ids = {m.id for m in oai.models.list()}
    assert {"m", "slow", "tools"} <= ids
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": long_question(4)},
    ]
    r = oai.chat.completions.create(model="m", messages=msgs, max_tokens=12)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == "m"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and SCRIPT.startswith(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 100


def test_openai_second_turn_reports_cached_tokens(oai: openai.OpenAI) -> None:
    history: list[dict[str, str]] = [{"role": "user", "content": long_question(10)}]
    first = oai.chat.completions.create(model="m", messages=history, max_tokens=40)  # type: ignore[arg-type]
    assert first.usage is not None
    history += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And tomorrow?"},
    ]
    second = oai.chat.completions.create(model="m", messages=history, max_tokens=8)  # type: ignore[arg-type]
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert cached >= first.usage.prompt_tokens  # the whole first turn came from the cache
    assert cached >= 0.9 * second.usage.prompt_tokens * 0.8


def test_openai_streaming_chat_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, reasons, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    assert text == SCRIPT[: len(text)] and len(text) == 10
    assert reasons == ["length"]
    assert usage is not None and usage.completion_tokens == 10


def test_openai_completions_streamed_and_not(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="m", prompt="Harbour report:", max_tokens=5)
    assert r.choices[0].text == SCRIPT[:5] and r.usage is not None
    parts = [
        c.choices[0].text
        for c in oai.completions.create(model="m", prompt="Harbour:", max_tokens=7, stream=True)
    ]
    assert "".join(parts) == SCRIPT[:7]


def test_openai_tool_call_comes_back_as_tool_calls(oai: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    r = oai.chat.completions.create(
        model="tools",
        messages=[{"role": "user", "content": "Weather in Lisbon?"}],
        tools=tools,
        max_tokens=80,  # type: ignore[arg-type]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Lisbon"}  # type: ignore[union-attr]


def test_openai_errors_have_the_right_status(oai: openai.OpenAI, url: str) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as br:
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2)
    assert br.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as ctx:
        oai.completions.create(model="m", prompt="x" * 5000, max_tokens=4)  # over n_ctx
    assert ctx.value.code == "context_length_exceeded"
    # malformed JSON, wrong types and unknown routes: clear errors, the daemon answers on
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": "hi"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (9 << 20))
    assert r.status_code == 413
    assert oai.models.list().data


# ================================================================ Anthropic
def test_anthropic_messages_streamed_and_not(url: str) -> None:
    client = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
    msg = client.messages.create(
        model="m",
        max_tokens=9,
        system="Be brief.",
        messages=[{"role": "user", "content": long_question(8)}],
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text == SCRIPT[:9]
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 9
    again = client.messages.create(
        model="m",
        max_tokens=3,
        system="Be brief.",
        messages=[{"role": "user", "content": long_question(8)}],
    )
    assert (again.usage.cache_read_input_tokens or 0) > 100
    with client.messages.stream(
        model="m", max_tokens=6, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == SCRIPT[:6] and final.usage.output_tokens == 6
    count = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert count.input_tokens > 2
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="nope", max_tokens=3, messages=[{"role": "user", "content": "x"}]
        )


# ================================================================ Ollama
def test_ollama_chat_generate_tags_ps(url: str) -> None:
    client = ollama.Client(host=url)
    names = {m.model for m in client.list().models}
    assert {"m", "slow", "tools"} <= names
    assert {m.model for m in client.ps().models} >= {"m"}
    r = client.chat(
        model="m", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 5}
    )
    assert r.message.content == SCRIPT[:5] and r.done and r.eval_count == 5
    parts = [
        p.message.content
        for p in client.chat(
            model="m",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            options={"num_predict": 4},
        )
    ]
    assert "".join(p or "" for p in parts) == SCRIPT[:4]
    g = client.generate(model="m", prompt="Report:", options={"num_predict": 3}, keep_alive="5m")
    assert g.response == SCRIPT[:3] and g.done_reason == "length"
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 404


# ================================================================ operations
def test_health_and_metrics_show_the_cache(url: str, oai: openai.OpenAI) -> None:
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    oai.completions.create(model="m", prompt=long_question(12), max_tokens=2)
    oai.completions.create(model="m", prompt=long_question(12), max_tokens=2)
    text = httpx.get(f"{url}/metrics").text
    assert 'erllama_http_requests_total{api="openai",model="m",outcome="ok"}' in text
    assert "erllama_prefix_tokens_reused_total" in text
    assert 'erllama_cache_hits_total{api="openai",kind="exact",model="m"}' in text or (
        'kind="partial",model="m"' in text
    )
    assert 'erllama_model_ready{model="m"} 1.0' in text
    assert "erllama_time_to_first_token_seconds_bucket" in text
    assert "erllama_router_up 1.0" in text


def test_a_client_that_leaves_cancels_its_request(url: str, gw: Daemon) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "slow", "prompt": "Go", "max_tokens": 500, "stream": True})
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        got = b""
        while b"data: " not in got:  # streaming has begun (recv has the socket's deadline)
            chunk = s.recv(4096)
            assert chunk, "the gateway closed the stream"
            got += chunk
    # the gateway counts the client gone, and the worker's request ends: the model is idle
    # long before its 500 tokens (10 s) would have been generated
    wait_until(
        lambda: 'model="slow",outcome="client_gone"' in httpx.get(f"{url}/metrics").text,
        10,
        what="client_gone counted",
    )
    with erllama.Client(gw.endpoint, timeout=10) as c:
        wait_until(lambda: c.phase("slow") == "idle", 5, what="slow idle after the cancel")
        assert c.queue_depth("slow") == 0


def test_api_keys_are_required_when_configured(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# operators\nsecret-1\n")
    config = {
        "models": [stub_model("m", script=SCRIPT)],
        "supervisor": {"heartbeat_interval_s": 1.0, "term_timeout_s": 3.0},
        "http": {"listen": "127.0.0.1:0", "api_keys_file": str(keys)},
    }
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", config, ready_timeout=60)
    try:
        url = d.http_url()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="secret-1", max_retries=0)
        assert [m.id for m in ok.models.list()] == ["m"]
        r = httpx.get(f"{url}/v1/models", headers={"x-api-key": "secret-1"})
        assert r.status_code == 200
        bad = anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(
                model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}]
            )
    finally:
        d.teardown()
