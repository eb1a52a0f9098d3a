// tools/tokens_convert.mjs: build-time converter from the npm rank tables to
// costrouter's compact token files (data/tokens/*.tok). Run by mk/tokens.mk;
// never on the request path.
//
// usage: node tools/tokens_convert.mjs NPM_PREFIX OUT_DIR
//
// Output format (little-endian), read by policy/tokenize.c:
//   char  magic[8]            "CRTOK1\0\0"
//   u32   ntokens
//   u32   blob_len
//   u32   ranks[ntokens]      rank (token id) of entry i, ascending
//   u32   offsets[ntokens+1]  entry i's bytes are blob[offsets[i]..offsets[i+1])
//   u8    blob[blob_len]
// Only ordinary tokens are written: special tokens are counted as plain text.
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [prefix, outDir] = process.argv.slice(2);
if (!prefix || !outDir) {
  console.error('usage: tokens_convert.mjs NPM_PREFIX OUT_DIR');
  process.exit(2);
}
const mods = path.resolve(prefix, 'node_modules');

function write(name, entries) {
  entries.sort((a, b) => a[0] - b[0]);
  const n = entries.length;
  let blobLen = 0;
  for (const [, bytes] of entries) blobLen += bytes.length;
  const head = Buffer.alloc(16 + 4 * n + 4 * (n + 1));
  head.write('CRTOK1\0\0', 0, 'latin1');
  head.writeUInt32LE(n, 8);
  head.writeUInt32LE(blobLen, 12);
  let off = 0;
  const blob = Buffer.alloc(blobLen);
  entries.forEach(([rank, bytes], i) => {
    head.writeUInt32LE(rank, 16 + 4 * i);
    head.writeUInt32LE(off, 16 + 4 * n + 4 * i);
    bytes.copy(blob, off);
    off += bytes.length;
  });
  head.writeUInt32LE(off, 16 + 4 * n + 4 * n);
  const file = path.join(outDir, name);
  fs.writeFileSync(file + '.tmp', Buffer.concat([head, blob]));
  fs.renameSync(file + '.tmp', file);
  console.log(`${file}: ${n} tokens, ${blobLen} bytes`);
}

// OpenAI's .tiktoken files: "base64 rank" per line.
function tiktoken(file) {
  const entries = [];
  for (const line of fs.readFileSync(file, 'latin1').split('\n')) {
    if (!line) continue;
    const [b64, rank] = line.split(' ');
    entries.push([Number(rank), Buffer.from(b64, 'base64')]);
  }
  return entries;
}

// GPT-2's byte <-> printable character map used by Hugging Face vocabularies.
function unicodeToByte() {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) { bs.push(b); cs.push(256 + n); n++; }
  }
  const map = new Map();
  bs.forEach((b, i) => map.set(String.fromCodePoint(cs[i]), b));
  return map;
}

fs.mkdirSync(outDir, { recursive: true });
const gpt = path.join(mods, 'gpt-tokenizer', 'data');
write('cl100k_base.tok', tiktoken(path.join(gpt, 'cl100k_base.tiktoken')));
write('o200k_base.tok', tiktoken(path.join(gpt, 'o200k_base.tiktoken')));

// Llama 3: the vocabulary's row number is the token id, and Meta's original
// tokenizer is tiktoken with rank = id, so ids serve as BPE ranks.
const llamaUrl = pathToFileURL(path.join(mods, 'llama3-tokenizer-js', 'bundle',
  'llama3-tokenizer-with-baked-data.js'));
const llama = (await import(llamaUrl.href)).default;
const u2b = unicodeToByte();
const entries = [];
for (let id = 0; id < 128000; id++) {
  const s = llama.vocabById[id];
  const bytes = [];
  for (const ch of s) {
    const b = u2b.get(ch);
    if (b === undefined) throw new Error(`llama3 token ${id}: unmapped char ${ch}`);
    bytes.push(b);
  }
  entries.push([id, Buffer.from(bytes)]);
}
write('llama3.tok', entries);
