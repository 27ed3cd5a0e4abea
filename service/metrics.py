"""Prometheus metrics of one service instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("keel_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("keel_request_duration_seconds", "HTTP request duration", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("keel_queue_texts", "texts waiting to be scored", registry=r)
        self.batch_size = Histogram("keel_batch_size", "texts per inference batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("keel_batch_tokens", "padded tokens per inference batch",
                                      buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768), registry=r)
        self.inference_seconds = Histogram("keel_inference_seconds", "engine time per inference batch",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.scores = Histogram("keel_score", "normalised scores per head (watch for drift)", ["head"],
                                buckets=(-3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3), registry=r)
        self.flagged = Counter("keel_flagged_total", "moderation flags per category", ["category"], registry=r)
        self.rejected = Counter("keel_rejected_total", "requests refused before scoring", ["reason"], registry=r)
        self.ready = Gauge("keel_ready", "1 when the model has answered its warm-up batch", registry=r)
