// bench/tokenize_tiktoken.mjs: the npm `tiktoken` package (OpenAI's Rust
// tokenizer built to WASM) on the same corpus and 1 KB prompt as
// bench/tokenize.c, to compare the two on one core (make bench-tokenize).
//
// usage: node bench/tokenize_tiktoken.mjs NPM_DIR CORPUS_BIN
// NPM_DIR holds node_modules/tiktoken (mk/tokens.mk installs it, pinned);
// the samples are split as expected.tsv next to CORPUS_BIN says. Texts are
// decoded to JS strings before timing (tiktoken takes strings, the C
// counter bytes), so the figures are the tokenizers' alone.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const [npmDir, corpusPath] = process.argv.slice(2);
if (!npmDir || !corpusPath) {
  console.error('usage: node bench/tokenize_tiktoken.mjs NPM_DIR CORPUS_BIN');
  process.exit(2);
}
const require = createRequire(path.join(path.resolve(npmDir), 'node_modules', 'x.js'));
const { get_encoding } = require('tiktoken');

const corpus = fs.readFileSync(corpusPath);
const tsv = fs.readFileSync(path.join(path.dirname(corpusPath), 'expected.tsv'), 'utf8');
const utf8 = new TextDecoder('utf-8'); // invalid bytes become U+FFFD, as in the C counter
const texts = [];
for (const line of tsv.split('\n')) {
  const f = line.split(/\s+/);
  if (f.length < 3) continue;
  const off = Number(f[1]), len = Number(f[2]);
  texts.push(utf8.decode(corpus.subarray(off, off + len)));
}
const prompt = utf8.decode(corpus.subarray(0, 1024));
const now = () => Number(process.hrtime.bigint()) / 1e9;

for (const name of ['cl100k_base', 'o200k_base']) {
  const enc = get_encoding(name);
  let tokens = 0, bytes = 0, rounds = 0;
  const t0 = now();
  do {
    for (const t of texts) {
      tokens += enc.encode_ordinary(t).length;
      bytes += Buffer.byteLength(t);
    }
    rounds++;
  } while (now() - t0 < 2.0);
  const dt = now() - t0;
  console.log(`tiktoken_corpus_${name}: ${(tokens / dt / 1e6).toFixed(2)} Mtokens/s ` +
              `(${(bytes / dt / 1e6).toFixed(1)} MB/s, ${texts.length} samples x ${rounds} rounds)`);
  const N = 20000, times = new Float64Array(N);
  let n = 0;
  for (let i = 0; i < N; i++) {
    const a = now();
    n = enc.encode_ordinary(prompt).length;
    times[i] = now() - a;
  }
  times.sort();
  console.log(`tiktoken_prompt_1kb_${name}: median ${(times[N / 2] * 1e6).toFixed(2)} us, ` +
              `p99 ${(times[Math.floor(N * 0.99)] * 1e6).toFixed(2)} us (${n} tokens)`);
  enc.free();
}
