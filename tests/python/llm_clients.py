"""The official OpenAI and Anthropic Python clients, traced by one instrumentation library, calling
a local fake LLM API (fake_llm.py) with known usage and exporting their spans to llmtail.

    llm_clients.py CASE OTLP_HTTP_BASE [--dump]

Every case makes the same calls, all inside one application span (the trace's root), per
provider it covers: one call answered whole, one streamed, one that fails (HTTP 400). With
`--dump` the spans are printed (name, scope, ids, attributes) instead of exported: how the
cases in `tests/e2e/llm_clients.rs` were learnt.
"""

from __future__ import annotations

import json
import os
import sys

import fake_llm

CASES = {
    # case: (providers, instrumentation)
    "openai-v2": (["openai"], "opentelemetry-instrumentation-openai-v2"),
    "openllmetry-openai": (["openai"], "opentelemetry-instrumentation-openai"),
    "openllmetry-anthropic": (["anthropic"], "opentelemetry-instrumentation-anthropic"),
    "openinference-openai": (["openai"], "openinference-instrumentation-openai"),
    "openinference-anthropic": (["anthropic"], "openinference-instrumentation-anthropic"),
    "anthropic-sdk": (["anthropic"], "the anthropic client's own tracing"),
    "anthropic-sdk-openinference": (["anthropic"], "own tracing under openinference"),
    "openlit-openai": (["openai"], "openlit"),
    "openlit-anthropic": (["anthropic"], "openlit"),
    "logfire-openai": (["openai"], "logfire"),
    "logfire-anthropic": (["anthropic"], "logfire"),
    "langfuse-openai": (["openai"], "langfuse"),
}


class Dump:
    """A span exporter that prints what the cases are made of."""

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        for s in spans:
            attrs = {
                k: (v if not isinstance(v, str) or len(v) < 200 else v[:200] + "...")
                for k, v in (s.attributes or {}).items()
            }
            print(
                json.dumps(
                    {
                        "name": s.name,
                        "scope": s.instrumentation_scope.name if s.instrumentation_scope else None,
                        "span": format(s.context.span_id, "016x"),
                        "parent": format(s.parent.span_id, "016x") if s.parent else None,
                        "status": s.status.status_code.name,
                        "start": s.start_time,
                        "end": s.end_time,
                        "events": [e.name for e in s.events],
                        "attributes": attrs,
                    },
                    default=str,
                )
            )
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=0):
        return True


def exporter(base: str, dump: bool):
    if dump:
        return Dump()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=base.rstrip("/") + "/v1/traces")


def main() -> None:
    case, base = sys.argv[1], sys.argv[2]
    dump = "--dump" in sys.argv
    providers, _ = CASES[case]
    api = fake_llm.start()
    os.environ.setdefault("OPENAI_API_KEY", "sk-fake")
    os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-fake")
    # The SDK's own tracing is on by default; only the cases that name it keep it.
    own_tracing = case.startswith("anthropic-sdk")

    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    span_exporter = exporter(base, dump)
    service = f"case-{case}"
    provider = None
    if case.startswith("logfire"):
        import logfire

        logfire.configure(
            send_to_logfire=False,
            service_name=service,
            console=False,
            additional_span_processors=[BatchSpanProcessor(span_exporter)],
            metrics=False,
        )
        tracer = logfire
    elif case.startswith("openlit"):
        import openlit

        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(provider)
        # A pricing table without the models (the default one is fetched from GitHub):
        # OpenLIT then writes a cost of 0, as it does for any model its table lacks.
        prices = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"openlit-prices-{os.getpid()}.json")
        with open(prices, "w") as f:
            f.write("{}")
        openlit.init(
            application_name=service,
            disable_metrics=True,
            disable_events=True,
            pricing_json=prices,
        )
        tracer = None
    else:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if case != "langfuse-openai":
            # (Langfuse adds its own processor with the exporter it is given.)
            provider.add_span_processor(
                SimpleSpanProcessor(span_exporter) if dump else BatchSpanProcessor(span_exporter)
            )
        trace.set_tracer_provider(provider)
        tracer = None

    langfuse = None
    if case == "openai-v2":
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

        OpenAIInstrumentor().instrument()
    elif case == "openllmetry-openai":
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor

        OpenAIInstrumentor().instrument()
    elif case == "openllmetry-anthropic":
        from opentelemetry.instrumentation.anthropic import AnthropicInstrumentor

        AnthropicInstrumentor().instrument()
    elif case == "openinference-openai":
        from openinference.instrumentation.openai import OpenAIInstrumentor

        OpenAIInstrumentor().instrument()
    elif case in ("openinference-anthropic", "anthropic-sdk-openinference"):
        from openinference.instrumentation.anthropic import AnthropicInstrumentor

        AnthropicInstrumentor().instrument()
    elif case == "langfuse-openai":
        from langfuse import Langfuse

        langfuse = Langfuse(
            public_key="pk-lf-fake",
            secret_key="sk-lf-fake",
            base_url=api,
            span_exporter=span_exporter,
            tracer_provider=provider,
            # Every span, the application's root included (by default only LLM ones).
            should_export_span=lambda span: True,
        )

    if tracer is None:
        tracer = trace.get_tracer("llmtail.tests.app")
        root = tracer.start_as_current_span("handle chat request")
    else:
        root = tracer.span("handle chat request")

    with root:
        for p in providers:
            if p == "openai":
                call_openai(api, case, langfuse)
            else:
                call_anthropic(api, case, own_tracing)
    if langfuse is not None:
        langfuse.flush()
    if case.startswith("logfire"):
        import logfire

        logfire.force_flush()
    if provider is not None:
        provider.force_flush()
        provider.shutdown()


def call_openai(api: str, case: str, langfuse) -> None:
    if case == "langfuse-openai":
        from langfuse.openai import openai as lf_openai

        client = lf_openai.OpenAI(base_url=api + "/v1", max_retries=0)
    else:
        import openai

        client = openai.OpenAI(base_url=api + "/v1", max_retries=0)
    if case.startswith("logfire"):
        import logfire

        logfire.instrument_openai(client)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    client.chat.completions.create(model="gpt-4o", messages=messages)
    stream = client.chat.completions.create(
        model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    for _ in stream:
        pass
    try:
        client.chat.completions.create(model=fake_llm.FAIL_MODEL, messages=messages)
        raise SystemExit("the failing call did not fail")
    except openai_error():
        pass


def openai_error():
    import openai

    return openai.BadRequestError


def call_anthropic(api: str, case: str, own_tracing: bool) -> None:
    import anthropic

    kwargs = {}
    if not own_tracing and "open_telemetry" in anthropic.Anthropic.__init__.__code__.co_varnames:
        kwargs["open_telemetry"] = False
    client = anthropic.Anthropic(base_url=api, max_retries=0, **kwargs)
    if case.startswith("logfire"):
        import logfire

        logfire.instrument_anthropic(client)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    model = "claude-sonnet-4-5-20250929"
    client.messages.create(model=model, max_tokens=256, messages=messages)
    with client.messages.stream(model=model, max_tokens=256, messages=messages) as stream:
        for _ in stream.text_stream:
            pass
    try:
        client.messages.create(model=fake_llm.FAIL_CLAUDE, max_tokens=256, messages=messages)
        raise SystemExit("the failing call did not fail")
    except anthropic.BadRequestError:
        pass


if __name__ == "__main__":
    main()
