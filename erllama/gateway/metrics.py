"""The Prometheus metrics of ``GET /metrics`` (prometheus-client, one registry per gateway).

Two sources:

* Requests served over HTTP, observed by the gateway as they end (labels ``model``,
  ``api``): requests by outcome (``ok``, ``cancelled`` or the error code), prompt and
  generated tokens, time to first token, inter-token gaps, cache hits by kind and the
  prompt tokens the cache supplied (``prefix_tokens_reused``; with ``prompt_tokens`` this
  is the hit rate, which llama-server does not report).
* The daemon's state, read from the router at each scrape (``daemon_status``,
  ``queue_depth``): per model ready, restarts, queue depth, sequences in use; per tier
  bytes, budget and rows. A scrape the router cannot answer leaves these out and sets
  ``erllama_router_up`` to 0.
* The shared remote tier's counters, read from the router (``counters``) at each scrape:
  ``erllama_remote_hits``, ``_misses``, ``_errors``, ``_bytes_up``, ``_bytes_down``,
  ``_fetch_seconds`` and the rest of ``REMOTE_COUNTERS`` (totals since the daemon
  started; a daemon without a remote tier reports zeros).
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from erllama.client import AsyncClient
from erllama.protocol.errors import ErllamaError
from erllama.protocol.messages import Stats

SCRAPE_TIMEOUT_S = 2.0
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
REMOTE_COUNTERS: dict[str, str] = {
    # meta counter (cache/rows.py) -> help text; exported as erllama_<name>
    "remote_hits": "Rows fetched from the remote tier, verified and promoted to ram",
    "remote_pointer_hits": "Remote hits found through a prefix pointer (rows of any length)",
    "remote_pointers_stale": "Remote prefix pointers to a row gone or not a prefix (deleted)",
    "remote_misses": "Remote lookups that found no usable row",
    "remote_errors": "Calls the remote store did not answer (down, refused, too slow)",
    "remote_skipped": "Remote lookups skipped while the store was marked down",
    "remote_corrupt": "Remote rows that failed verification (dropped from the store)",
    "remote_late": "Remote lookups answered locally at their deadline",
    "remote_bytes_up": "Bytes copied to the remote tier",
    "remote_bytes_down": "Bytes fetched from the remote tier",
    "remote_uploads": "Rows copied to the remote tier",
    "remote_uploads_dropped": "Rows never copied to the remote tier (queue bounds, outage)",
    "remote_reconnects": "Times the remote store answered again after an outage",
}


class Metrics:
    """The gateway's collectors (``observe`` per request, ``render`` per scrape)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        labels = ["model", "api"]
        self.requests = Counter(
            "erllama_http_requests",
            "HTTP generation requests by outcome",
            [*labels, "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "erllama_prompt_tokens", "Prompt tokens of HTTP requests", labels, registry=r
        )
        self.generated_tokens = Counter(
            "erllama_generated_tokens", "Tokens generated for HTTP requests", labels, registry=r
        )
        self.reused_tokens = Counter(
            "erllama_prefix_tokens_reused",
            "Prompt tokens the KV cache supplied (not prefilled)",
            labels,
            registry=r,
        )
        self.hits = Counter(
            "erllama_cache_hits", "Requests by cache hit kind", [*labels, "kind"], registry=r
        )
        self.ttft = Histogram(
            "erllama_time_to_first_token_seconds",
            "Time to the first generated token",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "erllama_inter_token_latency_seconds",
            "Gap between two generated tokens",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.router_up = Gauge("erllama_router_up", "1 when the router answered", registry=r)
        self.model_ready = Gauge(
            "erllama_model_ready", "1 when the model serves", ["model"], registry=r
        )
        self.restarts = Gauge("erllama_worker_restarts", "Worker restarts", ["model"], registry=r)
        self.queue = Gauge("erllama_queue_depth", "Requests waiting", ["model"], registry=r)
        self.seqs = Gauge(
            "erllama_sequences_in_use", "Sequences generating or prefilling", ["model"], registry=r
        )
        self.tier_bytes = Gauge(
            "erllama_tier_bytes", "Bytes held by a cache tier", ["tier"], registry=r
        )
        self.tier_budget = Gauge(
            "erllama_tier_budget_bytes", "Budget of a cache tier", ["tier"], registry=r
        )
        self.tier_rows = Gauge("erllama_tier_rows", "Rows in a cache tier", ["tier"], registry=r)
        self.remote = {
            name: Gauge(f"erllama_{name}", text, registry=r)
            for name, text in REMOTE_COUNTERS.items()
        }
        self.remote_fetch = Gauge(
            "erllama_remote_fetch_seconds",
            "Time spent in remote lookups (probe, fetch, verify, write), summed",
            registry=r,
        )

    def outcome(self, model: str, api: str, outcome: str) -> None:
        self.requests.labels(model, api, outcome).inc()

    def observe(
        self, model: str, api: str, stats: Stats, ttft_s: float | None, gaps: list[float]
    ) -> None:
        """A generation that ended (``done`` reached, possibly cancelled)."""
        self.outcome(model, api, "cancelled" if stats.cancelled else "ok")
        self.prompt_tokens.labels(model, api).inc(stats.prompt_tokens)
        self.generated_tokens.labels(model, api).inc(stats.completion_tokens)
        self.reused_tokens.labels(model, api).inc(stats.cache_delta.read)
        self.hits.labels(model, api, stats.cache_hit_kind).inc()
        if ttft_s is not None:
            self.ttft.labels(model, api).observe(ttft_s)
        h = self.itl.labels(model, api)
        for g in gaps:
            h.observe(g)

    async def render(self, client: AsyncClient) -> bytes:
        """The text exposition, after reading the daemon's state from the router."""
        try:
            status = await asyncio.wait_for(client.daemon_status(), SCRAPE_TIMEOUT_S)
            counters = await asyncio.wait_for(client.counters(), SCRAPE_TIMEOUT_S)
            depths = {
                m.id: await asyncio.wait_for(client.queue_depth(m.id), SCRAPE_TIMEOUT_S)
                for m in status.models
            }
        except (ErllamaError, TimeoutError):
            self.router_up.set(0)
        else:
            self.router_up.set(1)
            for gauge in (self.model_ready, self.restarts, self.queue, self.seqs):
                gauge.clear()
            for m in status.models:
                self.model_ready.labels(m.id).set(1 if m.state == "ready" else 0)
                self.restarts.labels(m.id).set(m.restarts)
                self.queue.labels(m.id).set(depths.get(m.id, 0))
                self.seqs.labels(m.id).set(0 if m.phase == "idle" else 1)
            for t in status.tiers:
                self.tier_bytes.labels(t.name).set(t.used_bytes)
                self.tier_budget.labels(t.name).set(t.budget_bytes)
                self.tier_rows.labels(t.name).set(t.rows)
            for name, gauge in self.remote.items():
                gauge.set(counters.get(name, 0))
            self.remote_fetch.set(counters.get("remote_fetch_ns", 0) / 1e9)
        return generate_latest(self.registry)
