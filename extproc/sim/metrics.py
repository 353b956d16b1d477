"""The simulator's /metrics: vLLM's v1 metric names, types, labels and buckets.

Gauges are read from the engine at scrape time, so they are always its live state; counters
and histograms are plain numbers the engine updates as requests progress, turned into metric
families at scrape time. The engine and the scrape share one event loop, so they need none of
prometheus_client's locks, which cost more than the engine's own work per request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Bucket boundaries as vLLM's v1 engine publishes them.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value``: vLLM's token-count buckets, sized by the context length."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


FINISHED_REASONS = ("stop", "length", "abort")


class EngineGauges(Collector):
    """Reads the engine's live state at every scrape."""

    def __init__(
        self,
        labels: dict[str, str],
        state: Callable[[], tuple[int, int, float]],
        cache_info: dict[str, str],
    ) -> None:
        self._label_names = list(labels)
        self._label_values = list(labels.values())
        self._state = state
        self._cache_info = cache_info

    def collect(self) -> Iterator[Metric]:
        running, waiting, usage = self._state()
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage),
        ):
            family = GaugeMetricFamily(name, doc, labels=self._label_names)
            family.add_metric(self._label_values, value)
            yield family
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(self._cache_info)
        )
        info.add_metric(list(self._cache_info.values()), 1.0)
        yield info


class Count:
    """A counter's value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Distribution:
    """A histogram's bucket counts (non-cumulative, the last one +Inf) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            cumulative += count
            out.append((bound, cumulative))
        return out


class SimMetrics(Collector):
    """Every vLLM series the simulator publishes, bound to one model and engine."""

    def __init__(
        self,
        model_name: str,
        engine: str,
        state: Callable[[], tuple[int, int, float]],
        block_size: int,
        num_gpu_blocks: int,
        max_model_len: int,
    ) -> None:
        labels = {"model_name": model_name, "engine": engine}
        self._label_names = list(labels)
        self._label_values = list(labels.values())
        self._counters: list[tuple[str, str, Count]] = []
        self._histograms: list[tuple[str, str, Distribution]] = []

        def counter(name: str, doc: str) -> Count:
            value = Count()
            self._counters.append((name, doc, value))
            return value

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Distribution:
            value = Distribution(buckets)
            self._histograms.append((name, doc, value))
            return value

        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.request_success = {reason: Count() for reason in FINISHED_REASONS}
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets
        )
        self.params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKEN_BUCKETS
        )
        cache_info = {
            "block_size": str(block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "engine": engine,
            "num_gpu_blocks": str(num_gpu_blocks),
        }
        # auto_describe: the registry learns which series each collector makes, so a request for some
        # (`?name[]=`) collects and renders only those.
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineGauges(labels, state, cache_info))
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        names, values = self._label_names, self._label_values
        for name, doc, count in self._counters:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, count.value)
            yield family
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=[*names, "finished_reason"]
        )
        for reason, count in self.request_success.items():
            success.add_metric([*values, reason], count.value)
        yield success
        for name, doc, distribution in self._histograms:
            family = HistogramMetricFamily(name, doc, labels=names)
            family.add_metric(values, distribution.buckets(), distribution.sum)
            yield family

    def exposition(self, names: Sequence[str] = ()) -> bytes:
        """The page; with ``names``, only those series, as prometheus_client's exposition (what vLLM mounts at
        /metrics) answers ``?name[]=...``: a scraper that reads three gauges then costs a few lines, not every
        histogram."""
        return generate_latest(self.registry.restricted_registry(names) if names else self.registry)
