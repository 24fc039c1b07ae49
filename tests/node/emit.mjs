// Emits LLM application traces with the official OpenTelemetry JavaScript SDK.
//
// Usage: node emit.mjs BASE_URL proto|json COUNT MANIFEST
// Sends COUNT traces to BASE_URL/v1/traces through the SDK's BatchSpanProcessor, with the
// OTLP/HTTP protobuf or JSON exporter, then writes MANIFEST (one object per trace: id, kind,
// model, tokens) for the Rust test to check. LLM spans use the OpenInference attributes.
import { writeFileSync } from 'node:fs';
import { SpanKind, SpanStatusCode, context, trace } from '@opentelemetry/api';
import { OTLPTraceExporter as JsonExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { OTLPTraceExporter as ProtoExporter } from '@opentelemetry/exporter-trace-otlp-proto';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BatchSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { NodeTracerProvider } from '@opentelemetry/sdk-trace-node';

const [baseUrl, protocol, countArg, manifestPath] = process.argv.slice(2);
const Exporter = protocol === 'proto' ? ProtoExporter : JsonExporter;
const provider = new NodeTracerProvider({
  resource: resourceFromAttributes({ 'service.name': 'node-agent' }),
  spanProcessors: [
    new BatchSpanProcessor(new Exporter({ url: `${baseUrl}/v1/traces` }), {
      maxExportBatchSize: 100,
      scheduledDelayMillis: 100,
    }),
  ],
});
const tracer = provider.getTracer('emit', '1.0.0');
const KINDS = ['error', 'slow', 'expensive_attr', 'expensive_tokens'];
const manifest = [];
let seed = 7;
const rand = (lo, hi) => {
  seed = (seed * 1103515245 + 12345) % 2147483648;
  return lo + (seed % (hi - lo));
};

for (let i = 0; i < Number(countArg); i++) {
  const kind = i % 5 === 0 ? KINDS[i % 4] : 'normal';
  const model = kind === 'expensive_tokens' ? 'claude-3-opus-20240229' : 'gpt-4o-mini';
  const [input, output] = kind === 'expensive_tokens' ? [5000, 2000] : [rand(100, 900), rand(20, 300)];
  const root = tracer.startSpan('POST /api/chat', { kind: SpanKind.SERVER });
  const ctx = trace.setSpan(context.active(), root);
  const llm = tracer.startSpan(
    `llm ${model}`,
    {
      kind: SpanKind.CLIENT,
      attributes: {
        'openinference.span.kind': 'LLM',
        'llm.model_name': model,
        'llm.provider': model.startsWith('claude') ? 'anthropic' : 'openai',
        'llm.token_count.prompt': input,
        'llm.token_count.completion': output,
        'llm.token_count.total': input + output,
      },
    },
    ctx,
  );
  if (kind === 'slow') llm.setAttribute('llm.latency_ms', 8000);
  if (kind === 'expensive_attr') llm.setAttribute('llm.cost.total', 0.3);
  if (kind === 'error') {
    llm.recordException(new Error('socket hang up'));
    llm.setStatus({ code: SpanStatusCode.ERROR, message: 'socket hang up' });
  }
  llm.end();
  tracer.startSpan('tool weather', { attributes: { 'gen_ai.tool.name': 'weather' } }, ctx).end();
  root.end();
  manifest.push({ trace_id: root.spanContext().traceId, kind, model, input, output });
}
await provider.shutdown();
writeFileSync(manifestPath, JSON.stringify(manifest));
