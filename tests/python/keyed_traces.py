"""Emits a skewed mix of request routes with the official OpenTelemetry Python SDK, for
the dynamic sampler: routes drawn with weight 1 / rank^1.5 over 25 routes.

Usage: keyed_traces.py ENDPOINT COUNT MANIFEST DURATION_S
Sends COUNT traces of 2 spans over OTLP/gRPC, spread evenly over DURATION_S seconds, with
trace ids from a seeded generator (the same ids every run, so two replicas can be fed the
same traces), then writes MANIFEST: one JSON object per trace with its id (hex), route and
send offset in seconds.
"""

import json
import random
import sys
import time

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import IdGenerator

from otlp_client import batch_provider

ROUTES = [f"/api/r{i:02d}" for i in range(25)]
WEIGHTS = [1 / (i + 1) ** 1.5 for i in range(25)]


class SeededIds(IdGenerator):
    def __init__(self, seed):
        self.rng = random.Random(seed)

    def generate_span_id(self):
        return self.rng.getrandbits(64) or 1

    def generate_trace_id(self):
        return self.rng.getrandbits(128) or 1


def main() -> None:
    endpoint, count, manifest_path, duration = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    provider = batch_provider(endpoint, "py-routes", count, id_generator=SeededIds(17))
    tracer = provider.get_tracer("keyed_traces", "1.0")
    rng = random.Random(23)
    manifest = []
    start = time.monotonic()
    for i in range(count):
        due = start + duration * i / count
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        route = rng.choices(ROUTES, WEIGHTS)[0]
        with tracer.start_as_current_span(f"GET {route}", kind=trace.SpanKind.SERVER) as root:
            root.set_attribute("http.route", route)
            with tracer.start_as_current_span("db.query"):
                pass
        manifest.append(
            {"trace_id": format(root.get_span_context().trace_id, "032x"), "route": route, "at": due - start}
        )
    provider.shutdown()
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
