"""`siglip serve`'s Prometheus metrics (prometheus_client)."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's Prometheus metrics (prometheus_client), in a registry of its own: requests, items, batch
    sizes, latency, the queue's depth, and the process's memory, CPU and open files."""

    def __init__(self, depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("siglip_requests", "Requests answered", ["route", "status"], registry=self.registry)
        self.items = Counter("siglip_items", "Items embedded", ["kind"], registry=self.registry)
        self.latency = Histogram(
            "siglip_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batches = Histogram(
            "siglip_batch_size", "Items per forward pass", ["kind"], buckets=BATCH_BUCKETS, registry=self.registry
        )
        Gauge("siglip_queue_depth", "Items waiting", registry=self.registry).set_function(depth)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, kind: str, size: int) -> None:
        self.items.labels(kind).inc(size)
        self.batches.labels(kind).observe(size)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
