// The official OpenAI Node client traced by OpenInference's instrumentation, calling the local
// fake LLM API (tests/python/fake_llm.py), exporting to llmtail over OTLP/HTTP protobuf.
//
// Usage: node llm_openai.mjs LLMTAIL_BASE_URL FAKE_API_BASE_URL
// The same calls as tests/python/llm_clients.py's OpenAI cases: one answered whole, one
// streamed, one that fails, inside one application span.
import { context, trace } from '@opentelemetry/api';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-proto';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BatchSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { NodeTracerProvider } from '@opentelemetry/sdk-trace-node';
import { OpenAIInstrumentation } from '@arizeai/openinference-instrumentation-openai';
import OpenAI from 'openai';

const [llmtail, api] = process.argv.slice(2);
const provider = new NodeTracerProvider({
  resource: resourceFromAttributes({ 'service.name': 'case-openinference-openai-js' }),
  spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter({ url: `${llmtail}/v1/traces` }))],
});
provider.register();
new OpenAIInstrumentation().manuallyInstrument(OpenAI);

const client = new OpenAI({ baseURL: `${api}/v1`, apiKey: 'sk-fake', maxRetries: 0 });
const messages = [{ role: 'user', content: 'What is the capital of France?' }];
const tracer = provider.getTracer('llmtail.tests.app');
const root = tracer.startSpan('handle chat request');
await context.with(trace.setSpan(context.active(), root), async () => {
  await client.chat.completions.create({ model: 'gpt-4o', messages });
  const stream = await client.chat.completions.create({
    model: 'gpt-4o',
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  for await (const _ of stream) {
    // read to the end
  }
  try {
    await client.chat.completions.create({ model: 'gpt-4o-fails', messages });
    throw new Error('the failing call did not fail');
  } catch (e) {
    if (!(e instanceof OpenAI.BadRequestError)) throw e;
  }
});
root.end();
await provider.forceFlush();
await provider.shutdown();
