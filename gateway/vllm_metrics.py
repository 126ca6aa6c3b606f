"""The same metrics under vLLM's names (`vllm:...`), so vLLM's Grafana dashboards and alerts
work against headrace unchanged.

Names, types, labels (`model_name`, and `engine` for per-worker series) and histogram
buckets follow vLLM's V1 engine. Worker-side series (requests running and waiting, KV cache
usage, token, preemption, prefix-cache and speculative-decoding counters) are read at scrape
time from the latest WorkerStats of each worker; `engine` is the worker's index on this
gateway. Per-request histograms are observed by the gateway when a request finishes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.histogram_bulk import observe_many

if TYPE_CHECKING:
    from gateway.engine_client import EngineClient
    from gateway.sequence import SequenceState

# vLLM's bucket choices (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# vLLM builds 1-2-5 buckets up to max_model_len; a fixed ladder up to 100k covers it.
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000)  # fmt: skip

# The worker-side series: (name, type, help, WorkerStats attribute or property).
WORKER_SERIES = (
    ("num_requests_running", "gauge", "Number of requests in model execution batches.",
     "num_running"),
    ("num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
     "num_waiting"),
    ("kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
     "kv_cache_usage"),
    ("prompt_tokens", "counter", "Number of prefill tokens processed.", "prompt_tokens"),
    ("generation_tokens", "counter", "Number of generation tokens processed.",
     "generation_tokens"),
    ("num_preemptions", "counter", "Cumulative number of preemption from the engine.",
     "num_preemptions"),
    ("prefix_cache_queries", "counter",
     "Prefix cache queries, in terms of number of queried tokens.", "prefix_cache_queries"),
    ("prefix_cache_hits", "counter",
     "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits"),
    ("spec_decode_num_drafts", "counter", "Number of spec decoding drafts.", "spec_steps"),
    ("spec_decode_num_draft_tokens", "counter", "Number of draft tokens.", "spec_proposed"),
    ("spec_decode_num_accepted_tokens", "counter", "Number of accepted tokens.",
     "spec_accepted"),
)  # fmt: skip


class VllmWorkerCollector(Collector):
    """Every worker's latest stats under vLLM's names, read when Prometheus scrapes."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model_name", "engine"]
        families: list[GaugeMetricFamily | CounterMetricFamily] = []
        for name, kind, doc, _ in WORKER_SERIES:
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            families.append(cls(f"vllm:{name}", doc, labels=labels))
        for index, w in enumerate(self.client.workers):
            if w.info is None:
                continue  # not introduced yet: nothing to say about it
            lv = [w.info.model_name, str(index)]
            for family, (_, _, _, attr) in zip(families, WORKER_SERIES, strict=True):
                family.add_metric(lv, float(getattr(w.stats, attr)))
        yield from families


class VllmMetrics:
    """vLLM-named per-request histograms and counters, in the gateway's registry."""

    def __init__(self, registry: CollectorRegistry, client: EngineClient) -> None:
        registry.register(VllmWorkerCollector(client))
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"vllm:{name}", doc, labels, registry=registry, buckets=buckets)

        self.ttft = hist(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )  # fmt: skip
        self.itl = hist(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )  # fmt: skip
        # The older name of ITL: per request, (last token - first token) / (tokens - 1).
        self.tpot = hist(
            "time_per_output_token_seconds", "Histogram of time per output token in seconds.",
            ITL_BUCKETS,
        )  # fmt: skip
        self.e2e = hist(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue = hist(
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS,
        )  # fmt: skip
        self.inference = hist(
            "request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.", LATENCY_BUCKETS,
        )  # fmt: skip
        self.prefill = hist(
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.", LATENCY_BUCKETS,
        )  # fmt: skip
        self.decode = hist(
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS,
        )  # fmt: skip
        self.prompt_len = hist(
            "request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS
        )
        self.gen_len = hist(
            "request_generation_tokens", "Number of generation tokens processed.", TOKEN_BUCKETS
        )
        self.success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            ["model_name", "finished_reason"], registry=registry,
        )  # fmt: skip

    def observe(self, model: str, seq: SequenceState) -> None:
        """Record one finished sequence; called by gateway.metrics.Metrics.observe."""
        end = seq.finished_at
        if end is None:
            return
        self.success.labels(model, seq.finish_reason or "abort").inc()
        self.prompt_len.labels(model).observe(len(seq.prompt_token_ids))
        self.gen_len.labels(model).observe(seq.num_tokens)
        self.e2e.labels(model).observe(end - seq.arrival)
        queue = seq.queue_time or 0.0
        if seq.queue_time is not None:
            self.queue.labels(model).observe(queue)
        first = seq.first_token_at
        if first is None:
            return
        self.ttft.labels(model).observe(first - seq.arrival)
        observe_many(self.itl.labels(model), seq.itl)  # one call per request, not per token
        if seq.num_tokens > 1:
            self.tpot.labels(model).observe((seq.last_token_at - first) / (seq.num_tokens - 1))
        # The gateway sees arrival, first token and end; the worker reports the queue part.
        prefill = max(0.0, first - seq.arrival - queue)
        self.prefill.labels(model).observe(prefill)
        self.decode.labels(model).observe(end - first)
        self.inference.labels(model).observe(prefill + end - first)
