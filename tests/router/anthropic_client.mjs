// tests/router/anthropic_client.mjs: the official @anthropic-ai/sdk npm
// client against the router's /v1/messages. Prints one JSON line of what
// it saw; test_anthropic_sdk.c asserts on it.
// Usage: node anthropic_client.mjs BASE_URL KEY MODE
// MODE: plain | stream | badkey | midstream (the upstream breaks mid-way) |
//       count (messages.countTokens) | models (models.list, every page; retrieve) |
//       batches (messages.batches.create, which the router does not serve) |
//       badkey-models (models.list with KEY)
import { createRequire } from 'node:module';

// The package lives in build/npm-anthropic (installed by make deps), not
// beside this script: resolve it from there.
const require = createRequire(`${process.env.ANTHROPIC_NPM_DIR}/`);
const sdk = require('@anthropic-ai/sdk');
const Anthropic = sdk.Anthropic ?? sdk.default ?? sdk;

const [baseURL, key, mode] = process.argv.slice(2);
// The SDK adds /v1/messages to its base URL itself.
const client = new Anthropic({ baseURL, apiKey: key, maxRetries: 0 });
const messages = [{ role: 'user', content: 'hello from the sdk' }];
const out = { mode };
try {
    if (mode === 'plain') {
        const r = await client.messages.create({
            model: 'claude', max_tokens: 5, system: 'be brief', messages });
        out.type = r.type;
        out.stop_reason = r.stop_reason;
        out.text = r.content.map((b) => b.text ?? '').join('');
        out.usage = r.usage;
    } else if (mode === 'stream' || mode === 'midstream') {
        const opts = mode === 'midstream' ? { headers: { 'x-mock-fault': 'close-midstream' } } : {};
        const stream = await client.messages.create(
            { model: 'claude', max_tokens: 64, messages, stream: true }, opts);
        out.types = [];
        out.text = '';
        for await (const event of stream) {
            out.types.push(event.type);
            if (event.type === 'content_block_delta' && event.delta.type === 'text_delta')
                out.text += event.delta.text;
            if (event.type === 'message_start') out.input = event.message.usage;
            if (event.type === 'message_delta') out.usage = event.usage;
        }
        // The helper that gathers a whole message from a stream, too.
        if (mode === 'stream') {
            const final = await client.messages.stream(
                { model: 'claude', max_tokens: 3, messages }).finalMessage();
            out.final_text = final.content.map((b) => b.text ?? '').join('');
            out.final_usage = final.usage;
        }
    } else if (mode === 'count') {
        const r = await client.messages.countTokens({
            model: 'claude', system: 'be brief', messages });
        out.count = r;
    } else if (mode === 'models') {
        out.ids = [];
        for await (const m of client.models.list()) out.ids.push(m.id);
        out.display_name = (await client.models.list()).data[0]?.display_name;
        out.retrieved = (await client.models.retrieve('claude')).id;
    } else if (mode === 'batches') {
        await client.messages.batches.create({ requests: [{ custom_id: 'a', params: {
            model: 'claude', max_tokens: 5, messages } }] });
    } else if (mode === 'badkey-models') {
        await client.models.list();
    } else if (mode === 'badkey') {
        await client.messages.create({ model: 'claude', max_tokens: 5, messages });
    }
    out.ok = true;
} catch (err) {
    out.ok = false;
    out.error_class = err?.constructor?.name;
    out.status = err?.status;
    out.error_type = err?.error?.error?.type ?? err?.error?.type;
    out.message = String(err?.message ?? err);
}
console.log(JSON.stringify(out));
