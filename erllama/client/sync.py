"""``Client``: the blocking client's public methods (its IO is ``sync_io.SyncIO``).

A ``Client`` belongs to one thread: ZeroMQ sockets are not thread-safe. Use
one client per thread, or ``AsyncClient`` in an event loop. Each method
builds its request in the core (``requests``), runs it (``SyncIO._call``,
``_stream`` or ``_run``) and returns the value; the full documentation of
every operation is here, and ``AsyncClient`` points to it.

Sockets: those of ``SyncIO`` (a DEALER to the daemon and its monitor PAIR).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from erllama.client.models import Completion
from erllama.client.sync_io import Stream, SyncIO
from erllama.protocol.messages import (
    CacheHit,
    DaemonStatus,
    ModelInfo,
    PrefillResult,
    SchedulerCheck,
    SchedulerStatus,
)

__all__ = ["Client", "Stream"]


class Client(SyncIO):
    """A blocking client of the erllama daemon.

    Args:
        endpoint: the daemon's client endpoint; ``None`` uses
            ``$ERLLAMA_ENDPOINT``, else ``ipc://<run dir>/client.sock``, the
            endpoint a plain ``erllama serve`` binds.
        timeout: a ``Timeout``, or a number of seconds for every phase, or
            ``None`` for the defaults (no request deadline; 5 s to connect).
        curve_server_key: for a ``tcp://`` endpoint with CURVE: the server's
            public key (z85, 40 characters) or its ``.key`` file.
        curve_secret_key: this client's ``.key_secret`` file (``erllama keys``),
            or its z85 secret key together with ``curve_public_key``. The
            public key must be in the daemon's ``curve_authorized_dir``; an
            unauthorized client gets no reply (``DaemonUnavailableError`` after
            ``Timeout.connect``).
        curve_public_key: this client's z85 public key (with a z85 secret key).

    The client connects on first use (or on ``with``) and cannot be reused
    after ``close()``. It is for one thread.

    Example::

        with erllama.Client() as c:
            print(c.complete("default", "Hello", response_tokens=16).reply)
    """

    def close(self) -> None:
        """Cancel unfinished streams and completions, then close the socket.

        Idempotent; the client cannot be used afterwards.
        """
        self._close()

    # ================================================================ lifecycle API
    def load_model(
        self, config: Mapping[str, Any] | None = None, model_id: str | None = None
    ) -> str:
        """Start a worker for a model and wait until it is loaded.

        Args:
            config: the model spec (REFERENCE §2: ``backend``, ``model_path``,
                ``context_opts``, ...); ``None`` or ``{}`` loads the bundled model.
            model_id: the id to load it under; ``None`` generates ``erllama_model_<N>``.

        Returns:
            The model id.

        Raises:
            ConflictError: ``already_loaded``.
            ModelLoadError: ``load_failed``, ``malformed_gguf``, ``oom``, ``context_failed``.
            InvalidRequestError: ``bad_request`` for an invalid config.
        """
        return self._call(self._core.load_model(config, model_id))

    def unload(self, model: str) -> None:
        """Stop a model's worker, saving its live KV first; returns once it has exited.

        The worker stops admitting (later requests get ``shutting_down``), lets the
        running request finish (cancelled after ``supervisor.drain_timeout_s``), takes
        the shutdown save of its live sequence and waits for its queued saves, up to
        ``cache.evict_save_timeout_ms`` (a save still unwritten then is abandoned and
        counted in ``saves_timed_out``). Its cache rows stay.

        Args:
            model: the model id.

        Raises:
            UnknownModelError: ``not_found``.
        """
        self._call(self._core.unload(model))

    unload_model = unload

    def list_models(self) -> list[ModelInfo]:
        """Every model the daemon knows, with its state: one ``ModelInfo`` per model."""
        return self._call(self._core.list_models())

    def model_info(self, model: str) -> ModelInfo:
        """One model's ``ModelInfo``.

        Raises:
            UnknownModelError: ``noproc`` for an unknown model.
        """
        return self._call(self._core.model_info(model))

    # ================================================================ inference
    def complete(self, model: str, prompt: str, **opts: Any) -> Completion:
        """Generate a completion and wait for it.

        Args:
            model: the model id.
            prompt: the prompt text (tokenized with special tokens added).
            **opts: request options: ``response_tokens``, ``parent_key``
                (32 bytes or 64 hex), ``session_id``, ``temperature``,
                ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
                ``seed``, ``grammar``, ``stop_sequences``, ``thinking``,
                ``thinking_budget_tokens``, ``parse_special`` (special-token markers
                in the prompt become special tokens; default off: plain text),
                ``keep_alive`` (seconds the model stays loaded once idle after this
                request; negative: never unload, 0: at once; default: the model's
                ``keep_alive_s``).

        Returns:
            The ``Completion``.

        Raises:
            InvalidRequestError: an unknown option or a bad value.
            UnknownModelError: the model is not loaded.
            WorkerCrashedError: the model's process died during the request.
            RequestTimeoutError: ``Timeout.request`` passed (the request is cancelled).
        """
        return self._call(self._core.complete(model, prompt, opts))

    def prefill_only(self, model: str, tokens: Sequence[int], **opts: Any) -> PrefillResult:
        """Prefill ``tokens`` and fire the finish save, with no sampling (``prefill_only``).

        Args:
            model: the model id.
            tokens: the prompt tokens.
            **opts: ``parent_key`` and ``session_id`` (other request options are ignored).

        Returns:
            The ``PrefillResult``: ``finish_key`` (None when the save was gated out),
            ``context_tokens``, ``committed_tokens``, ``cache_hit_kind``, ``cache_delta``.

        Raises:
            InvalidRequestError: ``empty_prefix``, ``invalid_token``, ``context_overflow``.
            UnknownModelError: the model is not loaded.
        """
        return self._call(self._core.prefill_only(model, tokens, opts))

    def stream(self, model: str, prompt: str, **opts: Any) -> Stream:
        """Generate a completion as a stream of events.

        The request is sent at once; iterate the returned ``Stream`` for its
        events. Leaving it early cancels the request.

        Args:
            model: the model id.
            prompt: the prompt text.
            **opts: request options, as for ``complete``.

        Returns:
            The ``Stream`` (iterable, a context manager, with ``request_id``).

        Raises:
            InvalidRequestError: an unknown option or a bad value.
        """
        return self._stream(self._core.stream(model, prompt, opts))

    def infer(self, model: str, tokens: Sequence[int], **params: Any) -> Stream:
        """Generate from a token prompt as a stream of events.

        Args:
            model: the model id.
            tokens: the prompt tokens.
            **params: request options, as for ``complete``.

        Returns:
            The ``Stream``.

        Raises:
            InvalidRequestError: an unknown option, a bad value or a bad token.
        """
        return self._stream(self._core.infer(model, tokens, params))

    def cancel(self, request_id: str) -> None:
        """Cancel the request ``request_id`` of a stream or completion of this client.

        Idempotent; an unknown id is a no-op.
        """
        self._call(self._core.cancel(request_id))

    # ================================================================ tokenizer
    def tokenize(self, model: str, text: str, *, parse_special: bool = False) -> list[int]:
        """Tokenize text with the model's tokenizer (special tokens added).

        Args:
            model: the model id.
            text: the text.
            parse_special: turn special-token markers in the text (``<start_of_turn>``...)
                into those special tokens; off, they are tokenized as plain text.

        Returns:
            The token ids.
        """
        return self._call(self._core.tokenize(model, text, parse_special=parse_special))

    def detokenize(self, model: str, tokens: Sequence[int]) -> str:
        """Turn the token ids ``tokens`` back into text with the model's tokenizer."""
        return self._call(self._core.detokenize(model, tokens))

    # ================================================================ observability
    def counters(self) -> dict[str, int]:
        """The cache and daemon counters: counter name -> value."""
        return self._call(self._core.counters())

    def vram_info(self) -> dict[str, int]:
        """GPU memory (``{total_b, free_b, used_b}``) summed over every GPU, read from NVML now.

        Works with the scheduler on or off.

        Raises:
            NotSupportedError: ``no_gpu`` (no GPU, no NVML, no scheduler process).
        """
        return self._call(self._core.vram_info())

    # ================================================================ scheduler API
    def scheduler_status(self) -> SchedulerStatus:
        """The memory-pressure scheduler: switch, watermarks, last sample, last action.

        Returns:
            A ``SchedulerStatus`` (``enabled``, ``high_watermark``, ``low_watermark``,
            ``last_ratio``, ``last_decision``, ``last_action``, ...).

        Raises:
            RequestTimeoutError: ``timeout`` (the scheduler process is not running).
        """
        return self._call(self._core.scheduler_status())

    def enable_scheduler(self) -> SchedulerStatus:
        """Start the pressure checks now (upstream ``enable(true)``); returns the status.

        Lasts until ``disable_scheduler`` or the daemon's stop (a restarted scheduler
        keeps it); the config's ``enabled`` is only the value at start.
        """
        return self._call(self._core.enable_scheduler(True))

    def disable_scheduler(self) -> SchedulerStatus:
        """Stop the pressure checks (upstream ``enable(false)``); returns the status.

        A plan already running finishes. ``vram_info`` keeps working.
        """
        return self._call(self._core.enable_scheduler(False))

    def set_scheduler_thresholds(self, *, high: float, low: float) -> SchedulerStatus:
        """Change the watermarks at run time (upstream ``set_thresholds(high, low)``).

        Args:
            high: act at or above this fraction of memory used.
            low: free memory down to this fraction.

        Returns:
            The new status.

        Raises:
            InvalidRequestError: ``bad_thresholds`` unless ``0 <= low < high <= 1``
                (the check the config gets at start).
        """
        return self._call(self._core.set_scheduler_thresholds(high, low))

    def force_scheduler_check(self) -> SchedulerCheck:
        """Check the pressure now (upstream ``force_check()``) and say what it did.

        Above the high watermark a plan runs at once (even if the last one has not
        settled) and the answer comes when it ends, or after 60 s with outcome
        ``running``.

        Returns:
            A ``SchedulerCheck``: ``outcome`` ``skipped`` (``reason`` disabled,
            no_sample, below_watermark, in_band or busy), ``acted`` (``action``: the
            steps and bytes freed) or ``running``.
        """
        return self._call(self._core.force_scheduler_check())

    def phase(self, model: str) -> str:
        """Lock-free phase of a model: ``idle``, ``prefilling`` or ``generating``.

        An unknown model reads as ``idle``.
        """
        return self._call(self._core.status_row(model)).phase

    def pending_len(self, model: str) -> int:
        """Requests waiting in the model's queue (lock-free; 0 for an unknown model)."""
        return self._call(self._core.status_row(model)).pending_len

    def last_cache_hit(self, model: str) -> CacheHit | None:
        """``CacheHit(kind, prefix_len)`` of the model's last admitted request (lock-free).

        None before the first request or for an unknown model.
        """
        return self._call(self._core.status_row(model)).last_cache_hit

    def queue_depth(self, model: str | None = None) -> int:
        """The count of admitted streaming requests of ``model``, or of every model for None."""
        return self._call(self._core.queue_depth(model))

    def list_cached_prefixes(self, model: str, tokens: Sequence[int]) -> int:
        """Length of the longest cached prefix of ``tokens`` for the model (0: nothing cached).

        Raises:
            UnknownModelError: ``model_not_loaded``.
        """
        return self._call(self._core.list_cached_prefixes(model, tokens))

    def status(self, model: str) -> str:
        """The model's phase (``idle``, ``prefilling`` or ``generating``), asked of its worker.

        A round trip, unlike ``phase``.
        """
        return self._call(self._core.status(model))

    def evict(self, model: str) -> None:
        """Save the live state of the model's in-flight requests (reason ``evict``)."""
        self._call(self._core.evict(model))

    def shutdown(self, model: str) -> None:
        """Like ``evict`` with save reason ``shutdown`` (a graceful-stop hook)."""
        self._call(self._core.shutdown(model))

    def daemon_status(self) -> DaemonStatus:
        """The ``DaemonStatus``: models, cache tiers with usage and budgets, run directory, pid."""
        return self._call(self._core.daemon_status())

    # ======================================================= templates, embeddings, adapters
    def apply_chat_template(self, model: str, request: Mapping[str, Any]) -> list[int]:
        """Render a chat with the model's own template and tokenize it (REFERENCE §1.3).

        Args:
            model: the model id.
            request: ``{"messages": [{"role": str, "content": str}, ...], "system": str,
                "tools": [{"name": str, "description": str, "schema": ...}]}``;
                ``system`` and ``tools`` are optional and are folded into one leading
                system message.

        Returns:
            The prompt tokens (the assistant prefix included, one BOS).

        Raises:
            InvalidRequestError: ``badarg``, ``invalid_content`` (a role or content that
                is not a string), ``too_large``, ``tokenize_failed``.
            NotSupportedError: ``not_supported``, ``no_template`` (the GGUF has none),
                ``template_failed``.
        """
        return self._call(self._core.apply_chat_template(model, request))

    def embed(self, model: str, tokens: Sequence[int]) -> list[float]:
        """The embedding of ``tokens`` (a model loaded with ``context_opts.embeddings``).

        Args:
            model: the model id.
            tokens: 1 .. n_batch token ids.

        Returns:
            ``n_embd`` floats (mean-pooled, not normalised).

        Raises:
            NotSupportedError: ``not_supported`` (not in embedding mode), ``embed_failed``.
            InvalidRequestError: ``invalid_token`` (an empty list too),
                ``context_overflow``, ``batch_overflow``.
        """
        return self._call(self._core.embed(model, tokens))

    def load_adapter(self, model: str, path: str | os.PathLike[str]) -> str:
        """Attach a LoRA adapter (a GGUF file on the daemon's host) at scale 1.0.

        Requests admitted afterwards run with it, and their cache rows are keyed by the
        effective fingerprint of the adapter set (REFERENCE §3.3).

        Args:
            model: the model id.
            path: the adapter file (resolved by the worker).

        Returns:
            An opaque handle.

        Raises:
            InvalidRequestError: ``enoent``, ``eacces``, ``eisdir`` (detail: the path).
            ModelLoadError: ``load_failed`` (llama.cpp refused the file).
            NotSupportedError: ``not_supported`` (the stub backend).
        """
        return self._call(self._core.load_adapter(model, path))

    def unload_adapter(self, model: str, handle: str) -> None:
        """Detach the adapter ``handle`` (from ``load_adapter``); an unknown handle is fine.

        Raises:
            NotSupportedError: ``not_supported`` (the stub backend).
        """
        self._call(self._core.unload_adapter(model, handle))

    def set_adapter_scale(self, model: str, handle: str, scale: float) -> None:
        """Change an adapter's scale; it moves to the end of the list.

        Args:
            model: the model id.
            handle: a handle from ``load_adapter``.
            scale: the new scale (a finite number).

        Raises:
            UnknownModelError: ``not_found`` (unknown handle).
            InvalidRequestError: ``badarg`` (a scale that is not a finite number).
        """
        self._call(self._core.set_adapter_scale(model, handle, scale))

    def list_adapters(self, model: str) -> list[dict[str, Any]]:
        """The model's attached adapters in list order: ``[{"handle": str, "scale": float}, ...]``.

        ``[]`` when none.
        """
        return self._call(self._core.list_adapters(model))

    # ================================================================ speculative decoding
    def draft_tokens(self, model: str, prefix: Sequence[int], max: int | None = None) -> list[int]:
        """Draft tokens for speculative decoding: one greedy ``infer`` of ``prefix``.

        Every generated token id is collected (also those with no text). If no ``done``
        arrives within 30 s the draft is cancelled and ``RequestTimeoutError`` is raised
        (upstream's facade; the client's own timeouts do not apply).

        Args:
            model: the drafting model's id.
            prefix: the context tokens.
            max: how many tokens to draft (``response_tokens``); 64 if None.

        Returns:
            The draft (may be shorter than ``max``: EOG, the context's end).

        Raises:
            InvalidRequestError: ``empty_prefix``, ``badarg`` (``max <= 0``),
                ``invalid_token``, ``context_overflow``.
            RequestTimeoutError: ``timeout`` (30 s).
            ErllamaError: the draft's ``error`` event (e.g. ``WorkerCrashedError``).
        """
        return self._run(self._core.draft(model, prefix, max))

    def verify(
        self, model: str, prefix: Sequence[int], candidates: Sequence[int], k: int
    ) -> tuple[int, int | Literal["eos"]]:
        """Check draft ``candidates`` against the model's greedy choices after ``prefix``.

        One forward pass over ``prefix + candidates[:k]`` (REFERENCE §1.6); the model's
        live KV is left as it was up to the part verify reused (workers/speculative.py).

        Args:
            model: the verifying model's id; it must be idle (no running or queued request).
            prefix: the context tokens.
            candidates: the drafted tokens.
            k: how many candidates to check (``> 0``; more than ``len(candidates)`` is fine).

        Returns:
            ``(accepted, next_token)``: the number of leading candidates the model agrees
            with, and its greedy token after them, or ``"eos"`` for an end of generation.

        Raises:
            InvalidRequestError: ``badarg`` (``k <= 0``), ``empty_prefix``, ``invalid_token``,
                ``context_overflow``; ``bad_request`` for a ``k`` that is not an int.
            ConflictError: ``busy``: a request is running or queued on the model.
            NotSupportedError: ``not_supported``: the backend cannot verify.
        """
        return self._call(self._core.verify(model, prefix, candidates, k))
