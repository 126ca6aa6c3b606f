"""Prometheus metrics at GET /metrics, named as vLLM names them with `headrace:` for `vllm:`.

Two sources. Worker gauges and counters (requests running and waiting, KV cache usage,
prompt and generation tokens, prefix cache queries and hits, preemptions) come from the
latest WorkerStats each worker sent, read at scrape time, labelled by worker. Per-request
histograms (time to first token, time per output token, end-to-end latency, token counts)
are observed by this gateway when a request finishes. gateway/vllm_metrics.py adds the
same under vLLM's own names (`vllm:`), so dashboards made for vLLM work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.sequence import SequenceState
from gateway.vllm_metrics import ITL_BUCKETS as TPOT_BUCKETS
from gateway.vllm_metrics import LATENCY_BUCKETS as E2E_BUCKETS
from gateway.vllm_metrics import TOKEN_BUCKETS, TTFT_BUCKETS, VllmMetrics

if TYPE_CHECKING:
    from gateway.engine_client import EngineClient

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class WorkerStatsCollector(Collector):
    """Reads every worker's latest stats when Prometheus scrapes."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model_name", "worker"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"headrace:{name}", doc, labels=labels)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"headrace:{name}", doc, labels=labels)

        up = gauge("worker_up", "1 when the worker answers heartbeats")
        running = gauge("num_requests_running", "Requests in model execution batches")
        waiting = gauge("num_requests_waiting", "Requests waiting to be processed")
        usage = gauge("kv_cache_usage_perc", "KV cache usage; 1 means 100 percent")
        free = gauge("num_kv_blocks_free", "KV cache blocks free (cached blocks included)")
        total = gauge("num_kv_blocks_total", "KV cache blocks in all")
        preempt = counter("num_preemptions", "Cumulative number of preemptions")
        prompt = counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)")
        gen = counter("generation_tokens", "Generation tokens produced")
        queries = counter("prefix_cache_queries", "Prefix cache queries, in tokens")
        hits = counter("prefix_cache_hits", "Prefix cache hits, in tokens")
        drafts = counter("spec_decode_num_draft_tokens", "Speculative tokens proposed")
        accepted = counter("spec_decode_num_accepted_tokens", "Speculative tokens accepted")
        steps = counter("spec_decode_num_verify_steps", "Requests' verification steps")
        mean_len = gauge(
            "spec_decode_mean_accepted_length",
            "Mean tokens gained per verification step (accepted proposals + 1)",
        )
        for w in self.client.workers:
            model = w.info.model_name if w.info else ""
            lv = [model, w.address]
            s = w.stats
            up.add_metric(lv, 1.0 if w.up else 0.0)
            if w.info is None:
                continue
            running.add_metric(lv, s.num_running)
            waiting.add_metric(lv, s.num_waiting)
            usage.add_metric(lv, s.kv_cache_usage)
            free.add_metric(lv, s.num_free_blocks)
            total.add_metric(lv, s.num_total_blocks)
            preempt.add_metric(lv, s.num_preemptions)
            prompt.add_metric(lv, s.prompt_tokens)
            gen.add_metric(lv, s.generation_tokens)
            queries.add_metric(lv, s.prefix_cache_queries)
            hits.add_metric(lv, s.prefix_cache_hits)
            drafts.add_metric(lv, s.spec_proposed)
            accepted.add_metric(lv, s.spec_accepted)
            steps.add_metric(lv, s.spec_steps)
            if s.spec_steps:
                mean_len.add_metric(lv, 1.0 + s.spec_accepted / s.spec_steps)
        queued = GaugeMetricFamily(
            "headrace:gateway_num_requests_queued",
            "This gateway's requests sent to a worker with no output yet",
        )
        queued.add_metric([], self.client.num_waiting)
        yield from (up, running, waiting, usage, free, total, preempt, prompt, gen, queries)
        yield from (hits, drafts, accepted, steps, mean_len, queued)


class Metrics:
    """The gateway's registry: worker stats plus per-request histograms."""

    def __init__(self, client: EngineClient) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(WorkerStatsCollector(client))
        self.vllm = VllmMetrics(self.registry, client)
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram(
            "headrace:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels, registry=r, buckets=TTFT_BUCKETS,
        )  # fmt: skip
        self.tpot = Histogram(
            "headrace:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            labels, registry=r, buckets=TPOT_BUCKETS,
        )  # fmt: skip
        self.e2e = Histogram(
            "headrace:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            labels, registry=r, buckets=E2E_BUCKETS,
        )  # fmt: skip
        self.prompt_len = Histogram(
            "headrace:request_prompt_tokens",
            "Number of prefill tokens processed.",
            labels, registry=r, buckets=TOKEN_BUCKETS,
        )  # fmt: skip
        self.gen_len = Histogram(
            "headrace:request_generation_tokens",
            "Number of generation tokens processed.",
            labels, registry=r, buckets=TOKEN_BUCKETS,
        )  # fmt: skip
        self.success = Counter(
            "headrace:request_success",
            "Count of finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=r,
        )  # fmt: skip

    def observe(self, model: str, seq: SequenceState) -> None:
        """Record one finished sequence (one engine request)."""
        end = seq.finished_at
        if end is None:
            return
        self.vllm.observe(model, seq)
        self.success.labels(model, seq.finish_reason or "abort").inc()
        self.prompt_len.labels(model).observe(len(seq.prompt_token_ids))
        self.gen_len.labels(model).observe(seq.num_tokens)
        self.e2e.labels(model).observe(end - seq.arrival)
        first = seq.first_token_at
        if first is not None:
            self.ttft.labels(model).observe(first - seq.arrival)
            if seq.num_tokens > 1:
                self.tpot.labels(model).observe((end - first) / (seq.num_tokens - 1))

    def observe_abort(self, model: str) -> None:
        """A request that ended before finishing (its client went away): counted only."""
        self.success.labels(model, "abort").inc()
        self.vllm.success.labels(model, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
