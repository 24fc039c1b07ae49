"""The SDK set-up the rule tests' clients share: a TracerProvider exporting over OTLP/gRPC
with a queue that holds every span (the tests count what llmtail accepts against what was
sent, so the SDK must not drop spans of its own when the machine is busy)."""

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def batch_provider(endpoint, service, count, **provider_args):
    provider = TracerProvider(resource=Resource.create({"service.name": service}), **provider_args)
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, insecure=True),
            max_export_batch_size=256,
            schedule_delay_millis=100,
            max_queue_size=count * 4 + 2048,
        )
    )
    return provider
