"""StubBackend: determinism, snapshot/restore, the fault knobs."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from erllama.config import ModelSpec, StubOpts
from erllama.protocol.errors import (
    ErrorCode,
    InvalidRequestError,
    ModelLoadError,
    NotSupportedError,
)
from erllama.workers.backend import ModelBackend, SamplerOptions
from erllama.workers.stub import BOS, EOS, StubBackend

pytestmark = pytest.mark.timeout(60)


def make(**stub: object) -> StubBackend:
    opts = {"n_ctx": 256, "n_vocab": 300, **stub}
    return StubBackend(ModelSpec(id="m", backend="stub", stub=StubOpts(**opts)))  # type: ignore[arg-type]


def generate(
    b: StubBackend, prompt: list[int], n: int, opts: SamplerOptions | None = None
) -> list[int]:
    """Cold prefill + n greedy steps on sequence 0."""
    b.seq_clear(0)
    b.prefill(0, prompt, 0)
    return continue_(b, n, opts)


def continue_(b: StubBackend, n: int, opts: SamplerOptions | None = None) -> list[int]:
    s = b.new_sampler(0, opts or SamplerOptions())
    out = []
    for _ in range(n):
        tok = s.sample()
        b.decode_one(0, tok, len(b.seq_tokens(0)))
        out.append(tok)
    return out


def test_is_a_model_backend() -> None:
    b = make()
    assert isinstance(b, ModelBackend)
    assert b.info.backend == "stub"
    assert b.info.n_vocab == 300
    assert len(b.info.fingerprint) == 32 and len(b.info.ctx_params_hash) == 32


def test_tokenizer_round_trip() -> None:
    b = make()
    toks = b.tokenize("héllo")
    assert toks[0] == BOS
    assert toks[1:] == [c + 3 for c in "héllo".encode()]
    assert b.tokenize("hi", add_special=False) == [ord("h") + 3, ord("i") + 3]
    assert b.detokenize(toks) == "héllo"
    assert b.token_to_piece(BOS) == b"" and b.token_to_piece(EOS) == b""
    assert b.token_to_piece(ord("A") + 3) == b"A"
    assert b.is_eog(EOS) and not b.is_eog(BOS)


def test_generation_is_deterministic_and_printable() -> None:
    b1, b2 = make(), make()
    prompt = b1.tokenize("The quick brown fox")
    out1 = generate(b1, prompt, 40)
    out2 = generate(b2, prompt, 40)
    assert out1 == out2
    assert all(0x20 + 3 <= t <= 0x7E + 3 for t in out1)
    # a different prompt gives a different continuation
    assert generate(b1, b1.tokenize("The quick brown cat"), 40) != out1


def test_seed_changes_output_only_with_temperature() -> None:
    b = make()
    prompt = b.tokenize("seeded")
    greedy = generate(b, prompt, 20)
    assert generate(b, prompt, 20, SamplerOptions(seed=7)) == greedy
    hot7 = generate(b, prompt, 20, SamplerOptions(temperature=0.8, seed=7))
    assert hot7 != greedy
    assert generate(b, prompt, 20, SamplerOptions(temperature=0.8, seed=7)) == hot7
    assert generate(b, prompt, 20, SamplerOptions(temperature=0.8, seed=8)) != hot7


def test_eos_only_after_trigger() -> None:
    b = make()
    assert generate(b, b.tokenize("stop here <eos>"), 1) == [EOS]
    assert EOS not in generate(b, b.tokenize("no trigger"), 200)


def test_snapshot_restore_gives_same_continuation() -> None:
    b = make()
    prompt = b.tokenize("snapshot me please")
    full = generate(b, prompt, 30)
    b.seq_clear(0)
    b.prefill(0, prompt, 0)
    first = continue_(b, 10)
    snap = b.state_snapshot(0)
    assert b.state_size(0) == len(snap)

    other = make()
    other.state_restore(0, memoryview(snap))
    assert other.seq_tokens(0) == prompt + first
    # a restore carries no logits: sampling needs the primer first
    with pytest.raises(RuntimeError, match="no logits"):
        other.new_sampler(0, SamplerOptions()).sample()
    n = len(other.seq_tokens(0))
    last = other.seq_tokens(0)[-1]
    other.seq_truncate(0, n - 1)
    other.prefill(0, [last], n - 1)
    assert first + continue_(other, 20) == full


def test_wrong_restore_changes_output() -> None:
    b = make()
    p1, p2 = b.tokenize("alpha prompt"), b.tokenize("alpha prompx")
    b.prefill(0, p1, 0)
    snap1 = b.state_snapshot(0)
    out2 = generate(b, p2, 10)
    b.state_restore(0, snap1)
    n = len(p1)
    b.seq_truncate(0, n - 1)
    b.prefill(0, [p1[-1]], n - 1)
    assert continue_(b, 10) != out2


def test_restore_rejects_garbage() -> None:
    b = make()
    with pytest.raises(ValueError):
        b.state_restore(0, b"not a snapshot")
    snap = bytearray(b.state_snapshot(0))
    snap += b"\x00\x00"
    with pytest.raises(ValueError):
        b.state_restore(0, bytes(snap))


def test_positions_and_context_are_checked() -> None:
    b = make(n_ctx=16)
    b.prefill(0, [5] * 10, 0)
    with pytest.raises(ValueError):
        b.prefill(0, [5], 3)  # not at the end of the sequence
    with pytest.raises(InvalidRequestError) as ei:
        b.prefill(0, [5] * 7, 10)
    assert ei.value.code == ErrorCode.CONTEXT_OVERFLOW
    with pytest.raises(InvalidRequestError) as ei:
        b.prefill(0, [300], 10)
    assert ei.value.code == ErrorCode.INVALID_TOKEN
    b.seq_truncate(0, 4)
    assert b.seq_tokens(0) == [5] * 4


def test_grammar_options() -> None:
    b = make()
    with pytest.raises(InvalidRequestError) as ei:
        b.new_sampler(0, SamplerOptions(grammar=""))
    assert ei.value.code == ErrorCode.BADARG
    with pytest.raises(NotSupportedError):
        b.new_sampler(0, SamplerOptions(grammar='root ::= "a"'))


def test_fail_load_and_small_vocab() -> None:
    with pytest.raises(ModelLoadError) as ei:
        make(fail_load="malformed_gguf")
    assert ei.value.code == "malformed_gguf"
    with pytest.raises(ModelLoadError):
        make(n_vocab=100)


def test_crash_mode_raise_after_n_tokens() -> None:
    b = make(crash_after_tokens=3, crash_mode="raise")
    b.prefill(0, b.tokenize("x"), 0)
    assert len(continue_(b, 3)) == 3
    with pytest.raises(RuntimeError, match="fault"):
        continue_(b, 1)


def test_hang_blocks_until_close() -> None:
    b = make(hang_after_tokens=2)
    b.prefill(0, b.tokenize("x"), 0)
    continue_(b, 2)
    entered = threading.Event()
    result: list[BaseException] = []

    def step() -> None:
        entered.set()
        try:
            continue_(b, 1)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=step)
    t.start()
    assert entered.wait(5)
    t.join(0.3)
    assert t.is_alive()  # blocked in decode, no progress
    b.close()
    t.join(5)
    assert not t.is_alive() and isinstance(result[0], RuntimeError)


def test_delays_are_interruptible() -> None:
    b = make(token_delay_ms=20_000)
    b.prefill(0, b.tokenize("x"), 0)
    timer = threading.Timer(0.2, b.close)
    timer.start()
    t0 = time.monotonic()
    continue_(b, 1)
    assert time.monotonic() - t0 < 10
    timer.cancel()


_CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    from erllama.config import ModelSpec, StubOpts
    from erllama.workers.backend import SamplerOptions
    from erllama.workers.stub import StubBackend
    b = StubBackend(ModelSpec(id="m", backend="stub",
                              stub=StubOpts(crash_after_tokens=2, crash_mode=sys.argv[1])))
    b.prefill(0, b.tokenize("crash"), 0)
    s = b.new_sampler(0, SamplerOptions())
    for _ in range(5):
        t = s.sample()
        b.decode_one(0, t, len(b.seq_tokens(0)))
        print("token", flush=True)
    """
)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("sigkill", -signal.SIGKILL), ("segfault", -signal.SIGSEGV), ("exit", 3)],
)
def test_process_crash_modes(mode: str, expected: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _CRASH_SCRIPT, mode],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == expected, proc.stderr.decode()
    assert proc.stdout.decode().count("token") == 2


def test_a_decode_step_advances_every_sequence_as_its_own_decode_would() -> None:
    from erllama.config import ContextOpts
    from erllama.workers.backend import DecodeItem

    spec = ModelSpec(
        id="m",
        backend="stub",
        stub=StubOpts(n_ctx=256, n_vocab=300),
        context_opts=ContextOpts(n_seq_max=3, n_batch=8),
    )
    b = StubBackend(spec)
    prompts = [[1, 5, 7, 9], [1, 8], [1, 40, 41]]
    alone = []
    for p in prompts:
        alone.append(generate(b, p, 6))
        b.seq_clear(0)
    samplers = []
    for seq, p in enumerate(prompts):
        b.prefill(seq, p, 0)
        samplers.append(b.new_sampler(seq, SamplerOptions()))
    out: list[list[int]] = [[], [], []]
    for _ in range(6):
        items = []
        for seq in (2, 0, 1):  # any order: rows follow the items
            tok = samplers[seq].sample()
            out[seq].append(tok)
            items.append(DecodeItem(seq, tok, len(b.seq_tokens(seq))))
        rows = b.decode_step(items)
        assert rows == [0, 1, 2]
        assert b.logits_snapshot(rows[0]) != b.logits_snapshot(rows[1])
    assert out == alone
    with pytest.raises(ValueError, match="one token per sequence"):
        b.decode_step([DecodeItem(0, 3, 10), DecodeItem(0, 4, 11)])
