"""Emits traces for the sampling-rule tests with the official OpenTelemetry Python SDK.

Usage: rule_traces.py ENDPOINT COUNT MANIFEST
Sends COUNT traces over OTLP/gRPC, in turn:
- gold: a request whose *tool* span (not the root) carries customer.tier=gold;
- health: a health check (root `GET /healthz`) whose child failed (status ERROR);
- error: an ordinary request whose child failed;
- normal: an ordinary request (customer.tier=free on the tool span).
Then writes MANIFEST: one JSON object per trace with its id (hex) and kind.
"""

import json
import sys

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from otlp_client import batch_provider

KINDS = ["gold", "health", "error", "normal", "normal"]


def main() -> None:
    endpoint, count, manifest_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    provider = batch_provider(endpoint, "py-shop", count)
    tracer = provider.get_tracer("rule_traces", "1.0")
    manifest = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        name = "GET /healthz" if kind == "health" else "POST /chat"
        with tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER) as root:
            root.set_attribute("http.route", "/healthz" if kind == "health" else "/chat")
            with tracer.start_as_current_span("lookup_account") as tool:
                tool.set_attribute("customer.tier", "gold" if kind == "gold" else "free")
                if kind in ("health", "error"):
                    tool.set_status(Status(StatusCode.ERROR, "backend down"))
        manifest.append({"trace_id": format(root.get_span_context().trace_id, "032x"), "kind": kind})
    provider.shutdown()
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
