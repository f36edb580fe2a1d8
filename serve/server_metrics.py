"""Prometheus metrics of the server, one registry per server so tests can read their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = tuple(2.0**i for i in range(13))  # 1 .. 4096 rows


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlet_inference_requests",
            "Inference requests by model and outcome (success, client_error, overloaded, "
            "server_error).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.rows = Counter(
            "mlet_inference_rows", "Rows scored, by model.", ["model"], registry=self.registry
        )
        self.latency = Histogram(
            "mlet_request_duration_seconds",
            "Time from the request body's arrival to the response, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "mlet_queue_duration_seconds",
            "Time a request waited for its batch to start, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "mlet_compute_duration_seconds",
            "Time the runtime spent on one batch, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "mlet_batch_rows",
            "Rows per runtime execution, by model.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queued_rows = Gauge(
            "mlet_queued_rows",
            "Rows waiting for a batch, by model.",
            ["model"],
            registry=self.registry,
        )

        self.oov_values = Counter(
            "mlet_oov_values",
            "Logged values never seen in training, which took their table's "
            "out-of-vocabulary row, by raw-row transform step and table.",
            ["model", "table"],
            registry=self.registry,
        )

    def oov_counter(self, model: str):
        """A callback for a transform step: counts one table's out-of-vocabulary values."""

        def count(table: str, values: int) -> None:
            self.oov_values.labels(model, table).inc(values)

        return count

    def batch_observer(self, model: str):
        """A callback for the batcher: records one execution and its requests' queue times."""
        compute, batch_rows, queue = (
            self.compute.labels(model),
            self.batch_rows.labels(model),
            self.queue.labels(model),
        )

        def observe(rows: int, compute_s: float, queue_s: list[float]) -> None:
            compute.observe(compute_s)
            batch_rows.observe(rows)
            for waited in queue_s:
                queue.observe(waited)

        return observe

    def answer_recorder(self, model: str):
        """A callback recording one answered request's rows and seconds; the labelled
        series are looked up once per model, not once per request."""
        success, rows, latency = (
            self.requests.labels(model, "success"),
            self.rows.labels(model),
            self.latency.labels(model),
        )

        def record(count: int, seconds: float) -> None:
            success.inc()
            rows.inc(count)
            latency.observe(seconds)

        return record

    def render(self) -> bytes:
        return generate_latest(self.registry)
