"""Emits LLM application traces with the official OpenTelemetry Python SDK.

Usage: emit_traces.py ENDPOINT COUNT MANIFEST grpc|http [PROMPT_BYTES]
Sends COUNT traces to ENDPOINT through the SDK's BatchSpanProcessor, with the OTLP/gRPC or
the OTLP/HTTP (protobuf) exporter (for HTTP, ENDPOINT is the base URL), then
writes MANIFEST: one JSON object per trace with its id, kind, model and token counts, so
the Rust test can check what llmtail kept and counted. With PROMPT_BYTES, every LLM span
also carries its prompt and completion as the GenAI convention records them
(`gen_ai.input.messages` / `gen_ai.output.messages`), about PROMPT_BYTES of prose in all.
"""

import json
import random
import sys
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

KINDS = ["error", "slow", "expensive_attr", "expensive_tokens"]
WORDS = (
    "the customer asked about their invoice and the assistant looked up the account history "
    "before answering with a summary of recent charges refunds shipping delays and a plan "
    "to resolve the open ticket while keeping the tone friendly concise and accurate"
).split()


def prose(rng, size):
    """About `size` bytes of text."""
    words, n = [], 0
    while n < size:
        w = rng.choice(WORDS)
        words.append(w)
        n += len(w) + 1
    return " ".join(words)


def main() -> None:
    endpoint, count, manifest_path, protocol = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    prompt_bytes = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    rng = random.Random(11)
    if protocol == "grpc":
        exporter = GrpcExporter(endpoint=endpoint, insecure=True)
    else:
        exporter = HttpExporter(endpoint=f"{endpoint}/v1/traces")
    provider = TracerProvider(resource=Resource.create({"service.name": "py-agent"}))
    # A queue that holds every span: the tests count what llmtail accepts against what was
    # sent, so the SDK must not drop spans of its own when the machine is busy.
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_export_batch_size=128, max_queue_size=count * 4 + 2048)
    )
    tracer = provider.get_tracer("emit_traces", "1.0")
    manifest = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)] if i % 5 == 0 else "normal"
        model = "claude-opus-4" if kind == "expensive_tokens" else "gpt-4o"
        tokens_in, tokens_out = (5000, 2000) if kind == "expensive_tokens" else (rng.randint(100, 900), rng.randint(20, 300))
        with tracer.start_as_current_span("agent.run") as root:
            root.set_attribute("app.step", i)
            with tracer.start_as_current_span(f"chat {model}", kind=trace.SpanKind.CLIENT) as llm:
                llm.set_attribute("gen_ai.operation.name", "chat")
                llm.set_attribute("gen_ai.system", "openai")
                llm.set_attribute("gen_ai.request.model", model)
                llm.set_attribute("gen_ai.usage.input_tokens", tokens_in)
                llm.set_attribute("gen_ai.usage.output_tokens", tokens_out)
                if prompt_bytes:
                    prompt = prose(rng, prompt_bytes * 3 // 5)
                    completion = prose(rng, prompt_bytes * 2 // 5)
                    llm.set_attribute(
                        "gen_ai.input.messages",
                        json.dumps([{"role": "user", "parts": [{"type": "text", "content": prompt}]}]),
                    )
                    llm.set_attribute(
                        "gen_ai.output.messages",
                        json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": completion}]}]),
                    )
                if kind == "slow":
                    llm.set_attribute("llm.latency_ms", 9000.0)
                if kind == "expensive_attr":
                    llm.set_attribute("gen_ai.usage.cost", 0.5)
                if kind == "error":
                    try:
                        raise TimeoutError("model call timed out")
                    except TimeoutError as exc:
                        llm.record_exception(exc)
                        llm.set_status(Status(StatusCode.ERROR, "timeout"))
            with tracer.start_as_current_span("tool lookup") as tool:
                tool.set_attribute("gen_ai.tool.name", "lookup")
            trace_id = format(root.get_span_context().trace_id, "032x")
        manifest.append(
            {"trace_id": trace_id, "kind": kind, "model": model, "input": tokens_in, "output": tokens_out}
        )
    provider.shutdown()
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
