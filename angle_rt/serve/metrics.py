"""Prometheus metrics of one server (its own registry, so tests can run several apps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from angle_rt.serve.batcher import Batcher, OnBatch

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

disable_created_metrics()  # no `*_created` series: they double the scrape for no use

#: name → help, as documented in docs/serving.md
DESCRIPTIONS = {
    "angle_rt_requests_total": "HTTP requests by route and status code",
    "angle_rt_request_duration_seconds": "HTTP request time by route",
    "angle_rt_requests_in_flight": "HTTP requests being served",
    "angle_rt_rejections_total": ("requests refused (429 load, 413 tokens, 408 slow body, 504 "
                                  "deadline) by reason"),
    "angle_rt_inputs_total": "inputs embedded",
    "angle_rt_tokens_total": "tokens embedded (after truncation, prompt included)",
    "angle_rt_tokenization_duration_seconds": "tokenization time per request",
    "angle_rt_queue_duration_seconds": "time a request waited for its first batch",
    "angle_rt_inference_duration_seconds": "time per batch in the backend (pad + run)",
    "angle_rt_batch_size": "inputs per batch",
    "angle_rt_batch_tokens": "tokens per batch, padded to its longest row",
    "angle_rt_queue_depth": "inputs waiting for a batch",
    "angle_rt_queued_tokens": "tokens waiting for a batch",
    "angle_rt_worker_restarts": "batches that failed outside the model run (their requests "
                                "failed, the worker went on)",
    "angle_rt_ready": "1 once the warm-up batch ran, 0 before and while draining",
}


@dataclass(frozen=True)
class ModelSeries:
    """One model's per-request series (labelled once: `labels()` costs µs a call)."""

    tokenization: Any
    queue: Any
    inputs: Any
    tokens: Any


class Metrics:
    """The server's instruments; `render()` is the `/metrics` body."""

    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()
        d = DESCRIPTIONS
        self.requests = Counter("angle_rt_requests", d["angle_rt_requests_total"],
                                ["route", "code"], registry=reg)
        self.request_seconds = Histogram("angle_rt_request_duration_seconds",
                                         d["angle_rt_request_duration_seconds"], ["route"],
                                         buckets=_SECONDS, registry=reg)
        self.in_flight = Gauge("angle_rt_requests_in_flight", d["angle_rt_requests_in_flight"],
                               registry=reg)
        self.rejections = Counter("angle_rt_rejections", d["angle_rt_rejections_total"],
                                  ["reason"], registry=reg)
        self.inputs = Counter("angle_rt_inputs", d["angle_rt_inputs_total"], ["model"],
                              registry=reg)
        self.tokens = Counter("angle_rt_tokens", d["angle_rt_tokens_total"], ["model"],
                              registry=reg)
        self.tokenization = Histogram("angle_rt_tokenization_duration_seconds",
                                      d["angle_rt_tokenization_duration_seconds"], ["model"],
                                      buckets=_SECONDS, registry=reg)
        self.queue = Histogram("angle_rt_queue_duration_seconds",
                               d["angle_rt_queue_duration_seconds"], ["model"],
                               buckets=_SECONDS, registry=reg)
        self.inference = Histogram("angle_rt_inference_duration_seconds",
                                   d["angle_rt_inference_duration_seconds"], ["model"],
                                   buckets=_SECONDS, registry=reg)
        self.batch_size = Histogram("angle_rt_batch_size", d["angle_rt_batch_size"], ["model"],
                                    buckets=_SIZES, registry=reg)
        self.batch_tokens = Histogram("angle_rt_batch_tokens", d["angle_rt_batch_tokens"],
                                      ["model"], buckets=_TOKENS, registry=reg)
        self.queue_depth = Gauge("angle_rt_queue_depth", d["angle_rt_queue_depth"], ["model"],
                                 registry=reg)
        self.queued_tokens = Gauge("angle_rt_queued_tokens", d["angle_rt_queued_tokens"],
                                   ["model"], registry=reg)
        self.worker_restarts = Gauge("angle_rt_worker_restarts",
                                     d["angle_rt_worker_restarts"], ["model"], registry=reg)
        self.ready = Gauge("angle_rt_ready", d["angle_rt_ready"], registry=reg)
        self._models: dict[str, ModelSeries] = {}
        self._routes: dict[tuple[str, int], tuple[Any, Any]] = {}

    def model(self, name: str) -> ModelSeries:
        """`name`'s tokenization, queue, inputs and tokens series."""
        series = self._models.get(name)
        if series is None:
            series = self._models[name] = ModelSeries(
                self.tokenization.labels(name), self.queue.labels(name),
                self.inputs.labels(name), self.tokens.labels(name))
        return series

    def request(self, route: str, code: int) -> tuple[Any, Any]:
        """The request counter of (`route`, `code`) and the duration histogram of `route`."""
        pair = self._routes.get((route, code))
        if pair is None:
            pair = self._routes[(route, code)] = (self.requests.labels(route, str(code)),
                                                  self.request_seconds.labels(route))
        return pair

    def on_batch(self, model: str) -> OnBatch:
        """The batcher's per-batch hook for `model`."""
        size, tokens, seconds = (self.batch_size.labels(model), self.batch_tokens.labels(model),
                                 self.inference.labels(model))

        def observe(items: int, padded_tokens: int, duration: float) -> None:
            size.observe(items)
            tokens.observe(padded_tokens)
            seconds.observe(duration)
        return observe

    def watch(self, model: str, batcher: Batcher) -> None:
        """Queue gauges read from the batcher at scrape time."""
        self.queue_depth.labels(model).set_function(lambda: batcher.queued_items)
        self.queued_tokens.labels(model).set_function(lambda: batcher.queued_tokens)
        self.worker_restarts.labels(model).set_function(lambda: batcher.worker_restarts)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
