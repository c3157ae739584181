// One call of the real Anthropic or OpenAI SDK against ccload, chosen by the
// first argument, for clients_test.go. It prints one JSON line: what the SDK
// returned, or what it threw, and how long the call took (SDK retries
// included). The SDKs run with their defaults, as a user's script would.
//
//   CCLOAD_URL=http://127.0.0.1:8080 CCLOAD_TOKEN=… CCLOAD_MODEL=… node sdk.mjs anthropic.create
import Anthropic from '@anthropic-ai/sdk';
import OpenAI from 'openai';

const base = process.env.CCLOAD_URL;
const apiKey = process.env.CCLOAD_TOKEN;
const model = process.env.CCLOAD_MODEL;
const anthropic = new Anthropic({ baseURL: base, apiKey });
const openai = new OpenAI({ baseURL: `${base}/v1`, apiKey });
const messages = [{ role: 'user', content: 'say hello' }];

const calls = {
  async 'anthropic.create'() {
    const m = await anthropic.messages.create({ model, max_tokens: 64, messages });
    return { text: m.content.map((c) => c.text).join(''), usage: m.usage, stop_reason: m.stop_reason };
  },
  async 'anthropic.stream'() {
    const s = anthropic.messages.stream({ model, max_tokens: 64, messages });
    let deltas = 0;
    s.on('text', () => deltas++);
    const m = await s.finalMessage();
    return { text: m.content.map((c) => c.text).join(''), usage: m.usage, stop_reason: m.stop_reason, deltas };
  },
  async 'anthropic.countTokens'() {
    const r = await anthropic.messages.countTokens({ model, messages });
    return { input_tokens: r.input_tokens };
  },
  async 'anthropic.models'() {
    const ids = [];
    for await (const m of anthropic.models.list()) ids.push(m.id);
    return { ids };
  },
  async 'openai.responses'() {
    const s = await openai.responses.create({ model, input: 'say hello', stream: true });
    const events = [];
    let text = '';
    let usage;
    for await (const e of s) {
      events.push({ type: e.type, seq: e.sequence_number });
      if (e.type === 'response.output_text.delta') text += e.delta;
      if (e.type === 'response.completed') usage = e.response.usage;
    }
    return { text, usage, events };
  },
  // The SDK's own stream helper, which checks the event sequence.
  async 'openai.responses.stream'() {
    const r = await openai.responses.stream({ model, input: 'say hello' }).finalResponse();
    return { text: r.output_text, usage: r.usage, status: r.status, response_error: r.error };
  },
  async 'openai.chat'() {
    const s = await openai.chat.completions.create({
      model, messages, stream: true, stream_options: { include_usage: true },
    });
    let text = '';
    let usage;
    for await (const c of s) {
      text += c.choices[0]?.delta?.content ?? '';
      if (c.usage) usage = c.usage;
    }
    return { text, usage };
  },
  async 'openai.models'() {
    const ids = [];
    for await (const m of openai.models.list()) ids.push(m.id);
    return { ids };
  },
};

const name = process.argv[2];
if (!calls[name]) {
  console.error(`unknown call ${name}; known: ${Object.keys(calls).join(', ')}`);
  process.exit(2);
}
const start = Date.now();
let out;
try {
  out = { ok: true, ...(await calls[name]()) };
} catch (e) {
  out = {
    ok: false,
    error: {
      class: e.constructor.name,
      api_error: e instanceof Anthropic.APIError || e instanceof OpenAI.APIError,
      status: e.status,
      type: e.error?.error?.type ?? e.error?.type ?? e.type,
      message: e.message,
      // The message of the API's error body (Anthropic nests it).
      api_message: e.error?.error?.message ?? e.error?.message,
    },
  };
}
out.elapsed_ms = Date.now() - start;
console.log(JSON.stringify(out));
