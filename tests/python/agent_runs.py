"""Long LLM agent runs, sent with the official OpenTelemetry Python SDK as an agent sends them.

Usage: agent_runs.py ENDPOINT RUNS MANIFEST STEPS STEP_SECONDS

RUNS agent runs go on at once, each for STEPS steps of STEP_SECONDS (staggered by up to one
step). A step is an LLM call (a KB of prompt and completion text) and a tool call, each a
child of the run's root span and each exported when it ends by the SDK's default
BatchSpanProcessor (OTLP/gRPC). The root span ends last, after the last step. Half of the
runs fail in their last step (status ERROR with an exception event); a quarter of the others
call an expensive model in their last step ($0.40 by cost attribute); the rest stay healthy
and cheap. MANIFEST gets one JSON object per run: its trace id, kind and span count.
"""

import json
import random
import sys
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

from emit_traces import prose

def kind_of(i):
    if i % 2 == 0:
        return "failing"
    return "expensive" if i % 8 == 1 else "healthy"


def main() -> None:
    endpoint, runs, manifest_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    steps, step_seconds = int(sys.argv[4]), float(sys.argv[5])
    rng = random.Random(26)
    provider = TracerProvider(resource=Resource.create({"service.name": "support-agent"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = provider.get_tracer("agent_runs", "1.0")

    start = time.monotonic()
    runs_state = []
    for i in range(runs):
        offset = rng.uniform(0, step_seconds)
        runs_state.append({"i": i, "kind": kind_of(i), "offset": offset, "root": None, "step": 0, "spans": 0})
    # One loop drives every run: each run's steps are due at offset + k * step_seconds.
    while any(r["step"] <= steps for r in runs_state):
        now = time.monotonic() - start
        due = min(r["offset"] + r["step"] * step_seconds for r in runs_state if r["step"] <= steps)
        if due > now:
            time.sleep(due - now)
        now = time.monotonic() - start
        for r in runs_state:
            if r["step"] > steps or r["offset"] + r["step"] * step_seconds > now:
                continue
            if r["root"] is None:
                r["root"] = tracer.start_span("invoke_agent support", attributes={"gen_ai.agent.name": "support"})
                r["spans"] = 1
            if r["step"] == steps:
                r["root"].end()
                r["step"] += 1
                continue
            ctx = trace.set_span_in_context(r["root"])
            last = r["step"] == steps - 1
            expensive = last and r["kind"] == "expensive"
            model = "claude-opus-4" if expensive else "gpt-4o-mini"
            llm = tracer.start_span(f"chat {model}", context=ctx, kind=trace.SpanKind.CLIENT)
            llm.set_attribute("gen_ai.operation.name", "chat")
            llm.set_attribute("gen_ai.system", "openai")
            llm.set_attribute("gen_ai.request.model", model)
            llm.set_attribute("gen_ai.usage.input_tokens", rng.randint(400, 1200))
            llm.set_attribute("gen_ai.usage.output_tokens", rng.randint(40, 200))
            llm.set_attribute("gen_ai.input.messages", json.dumps([{"role": "user", "parts": [{"type": "text", "content": prose(rng, 700)}]}]))
            llm.set_attribute("gen_ai.output.messages", json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": prose(rng, 300)}]}]))
            if expensive:
                llm.set_attribute("gen_ai.usage.cost", 0.40)
            if last and r["kind"] == "failing":
                try:
                    raise TimeoutError("the model call timed out after 3 retries")
                except TimeoutError as exc:
                    llm.record_exception(exc)
                    llm.set_status(Status(StatusCode.ERROR, "timeout"))
            llm.end()
            tool = tracer.start_span("execute_tool lookup_order", context=ctx)
            tool.set_attribute("gen_ai.tool.name", "lookup_order")
            tool.end()
            r["spans"] += 2
            r["step"] += 1
    provider.shutdown()
    manifest = [
        {"trace_id": format(r["root"].get_span_context().trace_id, "032x"), "kind": r["kind"], "spans": r["spans"]}
        for r in runs_state
    ]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
