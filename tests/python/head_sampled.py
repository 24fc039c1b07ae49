"""Emits traces whose tracestate a head sampler wrote, with the official OpenTelemetry
Python SDK: every trace carries an explicit randomness value (`ot=rv:`), a third of them
also a threshold `th:e` (p = 1/8) that the randomness may contradict.

Usage: head_sampled.py ENDPOINT COUNT MANIFEST
Sends COUNT traces of 2 spans over OTLP/gRPC, then writes MANIFEST: one JSON object per
trace with its id (hex), its rv (hex) and the th it was sent with ("" for none).
"""

import json
import random
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import TraceState

from otlp_client import batch_provider


class HeadSampler(Sampler):
    """Samples everything and writes the `ot` tracestate entry it is given on root spans;
    child spans carry their parent's tracestate, as the SDK's samplers do."""

    def __init__(self):
        self.ot = ""

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        parent = trace.get_current_span(parent_context).get_span_context()
        state = parent.trace_state if parent.is_valid else TraceState([("ot", self.ot)])
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, state)

    def get_description(self):
        return "HeadSampler"


def main() -> None:
    endpoint, count, manifest_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = random.Random(5)
    sampler = HeadSampler()
    provider = batch_provider(endpoint, "py-head", count, sampler=sampler)
    tracer = provider.get_tracer("head_sampled", "1.0")
    manifest = []
    for i in range(count):
        rv = format(rng.getrandbits(56), "014x")
        th = "e" if i % 3 == 0 else ""
        sampler.ot = f"th:{th};rv:{rv}" if th else f"rv:{rv}"
        with tracer.start_as_current_span("request") as root:
            with tracer.start_as_current_span("work"):
                pass
        manifest.append({"trace_id": format(root.get_span_context().trace_id, "032x"), "rv": rv, "th": th})
    provider.shutdown()
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
