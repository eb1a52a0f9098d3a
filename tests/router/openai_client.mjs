// tests/router/openai_client.mjs: the official openai npm client against
// the router. Prints one JSON line of what it saw; test_openai_sdk.c
// asserts on it. Usage: node openai_client.mjs BASE_URL KEY MODE
// MODE: plain | stream | badkey | midstream | retries (a chat with the
// SDK's default of 2 retries) | responses | responses-stream (the Responses
// API: client.responses.create, whole and streamed)
import { createRequire } from 'node:module';

// The package lives in build/npm-openai (installed by make deps), not
// beside this script: resolve it from there.
const require = createRequire(`${process.env.OPENAI_NPM_DIR}/`);
const OpenAI = require('openai');

const [baseURL, key, mode] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: key, maxRetries: mode === 'retries' ? 2 : 0 });
const messages = [{ role: 'user', content: 'hello from the sdk' }];
const out = { mode };
try {
    if (mode === 'plain') {
        const r = await client.chat.completions.create({ model: 'chat', messages });
        out.content = r.choices[0].message.content;
        out.usage = r.usage;
        const models = await client.models.list();
        out.models = models.data.map((m) => m.id);
        out.retrieved = (await client.models.retrieve('chat')).id;
        const e = await client.embeddings.create({ model: 'chat', input: 'hi' });
        out.embedding_len = e.data[0].embedding.length;
    } else if (mode === 'stream' || mode === 'midstream') {
        const opts = mode === 'midstream' ? { headers: { 'x-mock-fault': 'close-midstream' } } : {};
        const stream = await client.chat.completions.create(
            { model: 'chat', messages, stream: true, stream_options: { include_usage: true } }, opts);
        out.chunks = 0;
        out.text = '';
        for await (const chunk of stream) {
            out.chunks++;
            if (chunk.choices.length) out.text += chunk.choices[0].delta.content ?? '';
            if (chunk.usage) out.usage = chunk.usage;
        }
    } else if (mode === 'responses') {
        const r = await client.responses.create({
            model: 'chat', instructions: 'be brief', input: 'hello from the sdk',
            max_output_tokens: 5 });
        out.status = r.status;
        out.text = r.output_text;
        out.usage = r.usage;
    } else if (mode === 'responses-stream') {
        const stream = await client.responses.create({
            model: 'chat', input: [{ role: 'user', content: 'hello from the sdk' }], stream: true });
        out.types = [];
        out.text = '';
        for await (const event of stream) {
            out.types.push(event.type);
            if (event.type === 'response.output_text.delta') out.text += event.delta;
            if (event.type === 'response.completed') out.usage = event.response.usage;
        }
    } else if (mode === 'badkey' || mode === 'retries') {
        await client.chat.completions.create({ model: 'chat', messages });
    }
    out.ok = true;
} catch (err) {
    out.ok = false;
    out.error_class = err.constructor.name;
    out.status = err.status ?? null;
    out.code = err.code ?? null;
    out.message = String(err.message);
}
console.log(JSON.stringify(out));
