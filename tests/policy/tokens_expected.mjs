// tests/policy/tokens_expected.mjs: writes the tokenizer test corpus and
// the reference token ids for it, computed by the pinned npm packages:
// tiktoken (the Rust core as WASM) for cl100k_base/o200k_base, checked
// against js-tiktoken, and llama3-tokenizer-js for Llama 3.
//
// JavaScript's \s differs from Rust's in two code points: U+FEFF is space
// only in JS, U+0085 only in Rust. costrouter follows tiktoken (Rust), as
// OpenAI's API does, so samples holding either are flagged (jsdiv = 1):
// js-tiktoken and llama3-tokenizer-js are not the reference for those.
// The script fails if js-tiktoken and tiktoken disagree on any other
// sample, which proves these two code points are the only divergence.
// Run by mk/tokens.mk at build time; tests/policy/test_tokenize.c reads the
// output.
//
// usage: node tests/policy/tokens_expected.mjs NPM_PREFIX OUT_DIR
// OUT_DIR/corpus.bin   all samples, concatenated as raw bytes
// OUT_DIR/expected.tsv one sample per line:
//   name offset length jsdiv cl100k_count cl100k_fnv o200k_count o200k_fnv llama3_count llama3_fnv
// where *_fnv is FNV-1a (32 bit) over the ids as little-endian u32. Bytes
// that are not valid UTF-8 are decoded as Node does (WHATWG, U+FFFD).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';

const [prefix, outDir] = process.argv.slice(2);
const mods = path.resolve(prefix, 'node_modules');
const require = createRequire(path.join(mods, 'x.js'));
const { getEncoding } = require('js-tiktoken');
const { get_encoding } = require('tiktoken');
const llama = (await import(pathToFileURL(path.join(mods, 'llama3-tokenizer-js', 'bundle',
  'llama3-tokenizer-with-baked-data.js')).href)).default;

const cl = getEncoding('cl100k_base'), o2 = getEncoding('o200k_base');
const wasm = { cl: get_encoding('cl100k_base'), o2: get_encoding('o200k_base') };
const never = /(?!)/g;

// Deterministic pseudo-random numbers (xorshift32).
let seed = 0x2545f491;
const rnd = (n) => { seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0; return seed % n; };
const pick = (a) => a[rnd(a.length)];

const samples = [];
const add = (name, data) => samples.push([name, Buffer.isBuffer(data) ? data : Buffer.from(data, 'utf8')]);
const file = (rel) => fs.readFileSync(path.join(mods, rel));

// English, code and JSON from the pinned packages, whole and by line groups.
const texts = {
  readme_llama3: file('llama3-tokenizer-js/README.md'),
  readme_tiktoken: file('tiktoken/README.md'),
  code_llama3_js: file('llama3-tokenizer-js/src/llama3-tokenizer.js'),
  code_py: file('llama3-tokenizer-js/src/data-conversion.py'),
  json_registry: file('tiktoken/registry.json'),
  json_models: file('tiktoken/model_to_encoding.json'),
  json_package: file('js-tiktoken/package.json'),
  testplans: file('gpt-tokenizer/data/TestPlans.txt').subarray(0, 200000),
};
for (const [name, buf] of Object.entries(texts)) {
  add(name, buf);
  const lines = buf.toString('utf8').split('\n');
  for (let i = 0, k = 0; i < lines.length; k++) {
    const n = 1 + rnd(12);
    add(`${name}#${k}`, lines.slice(i, i + n).join('\n') + (rnd(3) ? '\n' : ''));
    i += n;
  }
}

const prose = [
  "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see what they've done.",
  "I'M SHOUTING, you're whispering, THEY'LL LISTEN and WE'D agree. O'Neil's café costs $12.50!",
  "Price: 1234567.89 EUR (≈ 1,340,000 USD) — 100% guaranteed… or 0.5x your money back?",
  "日本語のテキストも数えます。東京は日本の首都です。中文文本：我们今天去公园散步。한국어 문장도 있습니다.",
  "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥 🧑🏿‍🚀 and ✓✗★☆ symbols ♠♥♦♣.",
  "العربية: مرحبا بالعالم، كيف حالك اليوم؟ עברית: שלום עולם, מה שלומך? فارسی: سلام دنیا",
  "Русский текст: Привет, мир! Ελληνικά: Γειά σου κόσμε. हिन्दी: नमस्ते दुनिया। ภาษาไทย: สวัสดีชาวโลก",
  "Combining marks: e\u0301 a\u0308 n\u0303 Z\u0351\u0360a\u0344l\u0353g\u0355o; zero\u200bwidth\u200djoiner\ufeffBOM",
  "Special tokens as text: <|endoftext|> <|fim_prefix|><|fim_middle|><|fim_suffix|> <|endofprompt|> <|begin_of_text|><|start_header_id|>user<|end_header_id|> <|eot_id|>",
  "Mixed CaseWords likeThis AndTHAT ÉCOLE élève ÀlaCarte McDonald's DON'T can'T WON'T it's IT'S",
  "path/to/file.txt http://example.com/a/b?c=d&e=f#g C:\\Windows\\System32 ~/.bashrc //comment /* block */",
  "Numbers 1 12 123 1234 12345 123456 1234567 ١٢٣٤ ٥٦٧ ১২৩ 一二三 ⅠⅡⅢ ½ ² ³",
];
prose.forEach((p, i) => add(`prose${i}`, p));

// Code and JSON written here.
add('code_c', `int main(int argc, char **argv)\n{\n\tfor (int i = 0; i < argc; i++) {\n\t\tprintf("%s\\n", argv[i]);\n\t}\n\treturn 0; // done\n}\n`);
add('code_py_inline', "def f(x):\n    return [y**2 for y in range(x) if y % 3 == 0]\n\n\nclass A:\n    pass\n");
add('json_chat', JSON.stringify({ model: 'gpt-4o', messages: [{ role: 'user', content: 'Hi 👋 there\n\n' }], tools: [], n: 1, temperature: 0.7 }, null, 2));
add('json_compact', '{"a":[1,2,3],"b":{"c":null,"d":true,"e":"\\u00e9\\n"},"f":-1.5e10}');

// Whitespace runs of many lengths and kinds.
for (const ws of [' ', '\t', '\n', '\r\n', '\u3000', '\u00a0', ' \n', '\u2003', '\u0085', '\u2028', '\ufeff']) {
  for (const n of [1, 2, 3, 7, 16, 33, 100, 257]) {
    add(`ws_${ws.codePointAt(0).toString(16)}_${n}`, 'a' + ws.repeat(n) + 'b');
    add(`ws_${ws.codePointAt(0).toString(16)}_${n}_end`, 'x' + ws.repeat(n));
  }
}
add('ws_mixed', ' \t \n\n   \r\n\t\t  x  \n \n  y\t\t\n');

// Long single pieces: exercise the heap merge against the reference.
for (const [name, s] of [['long_a', 'a'.repeat(3000)], ['long_space', ' '.repeat(3000)],
  ['long_ab', 'ab'.repeat(1500)], ['long_digits', '7'.repeat(2000)], ['long_upper', 'Q'.repeat(1000) + 'z'.repeat(1000)],
  ['long_cjk', '的'.repeat(1500)], ['long_punct', '!?'.repeat(1000)], ['long_word', 'pneumonoultramicroscopicsilicovolcanoconiosis'.repeat(40)],
  ['long_newlines', '\n'.repeat(2000)], ['long_emoji', '😀'.repeat(500)]]) add(name, s);

// Random strings from mixed pools, short and medium.
const pool = [...'abcxyzABCXYZ0123456789 \t\n\r.,;:!?\'"-_/\\()[]{}<>|@#$%^&*+=~`',
  'é', 'ß', 'ñ', 'Ø', 'ſ', 'İ', 'ǅ', 'ʰ', '\u0301', '\u0308', 'ক', '্', 'ष', 'ि', '日', '本', '語', 'ア', 'ー', '한',
  'ا', 'ل', 'ع', 'ש', 'ם', '١', '٢', 'Ⅳ', '²', '😀', '👍', '🏽', '\u200d', '\ufe0f', '\u3000', '\u00a0', '\u2028',
  '\u0085', '\ufeff', '\u200b', 'ſt', "'s", "'LL", "'Re", '\u180e', '\u{10000}', '\u{1F600}', '\u{E0001}'];
for (let i = 0; i < 3000; i++) {
  const n = 1 + rnd(i < 2500 ? 24 : 400);
  let s = '';
  for (let k = 0; k < n; k++) s += pick(pool);
  add(`rand${i}`, s);
}

// Random ASCII-only strings: the tokenizer splits all-ASCII text with
// ASCII twins of the patterns (policy/tokenize.c), so every class edge
// is drawn often here: each control character, letters of both cases,
// digits, the contraction suffixes in any case, and runs of white space.
const ascii = [...Array.from({ length: 128 }, (_, c) => String.fromCharCode(c)),
  ...'aAzZ09 \n\r\t', "'s", "'S", "'t", "'re", "'VE", "'m", "'Ll", "'d", "'", '  ', '\r\n', ' \n', '/\n'];
for (let i = 0; i < 2000; i++) {
  const n = 1 + rnd(i < 1600 ? 24 : 300);
  let s = '';
  for (let k = 0; k < n; k++) s += pick(ascii);
  add(`ascii${i}`, s);
}

// Invalid UTF-8: random bytes and classic bad sequences inside text.
const bad = [[0x80], [0xbf], [0xc0, 0x80], [0xc1, 0xbf], [0xe0, 0x80, 0x80], [0xed, 0xa0, 0x80],
  [0xed, 0xbf, 0xbf], [0xf0, 0x80, 0x80, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xf5], [0xff], [0xfe],
  [0xe2, 0x82], [0xf0, 0x9f, 0x98], [0xc3], [0xe3, 0x81, 0x82, 0x80]];
for (let i = 0; i < 400; i++) {
  const parts = [];
  const n = 1 + rnd(10);
  for (let k = 0; k < n; k++) {
    const r = rnd(4);
    if (r === 0) parts.push(Buffer.from(pick(bad)));
    else if (r === 1) parts.push(Buffer.from(Array.from({ length: 1 + rnd(8) }, () => rnd(256))));
    else parts.push(Buffer.from(pick(prose).slice(rnd(20), 20 + rnd(40)), 'utf8'));
  }
  add(`invalid${i}`, Buffer.concat(parts));
}
add('invalid_truncated_end', Buffer.from([0x61, 0xf0, 0x9f, 0x98]));
add('nul_bytes', Buffer.from([0x61, 0, 0, 0x62, 0, 0x20, 0]));

// Reference ids.
const fnv = (ids) => {
  let h = 0x811c9dc5;
  for (const id of ids) for (let k = 0; k < 4; k++) { h ^= (id >>> (8 * k)) & 0xff; h = Math.imul(h, 0x01000193) >>> 0; }
  return h >>> 0;
};
fs.mkdirSync(outDir, { recursive: true });
const lines = [];
let off = 0, disagree = 0;
for (const [name, buf] of samples) {
  const text = buf.toString('utf8');
  const jsdiv = /[\u0085\ufeff]/.test(text) ? 1 : 0;
  const a = wasm.cl.encode_ordinary(text), b = wasm.o2.encode_ordinary(text);
  const c = llama.encode(text, { bos: false, eos: false, specialTokenRegex: never });
  const ja = cl.encode(text, [], []), jb = o2.encode(text, [], []);
  if (fnv(ja) !== fnv(a) || fnv(jb) !== fnv(b)) {
    disagree++;
    if (!jsdiv) { console.error(`js-tiktoken != tiktoken on ${name}, which has no U+0085/U+FEFF`); process.exit(1); }
  }
  lines.push([name, off, buf.length, jsdiv, a.length, fnv(a), b.length, fnv(b), c.length, fnv(c)].join('\t'));
  off += buf.length;
}
fs.writeFileSync(path.join(outDir, 'corpus.bin'), Buffer.concat(samples.map((s) => s[1])));
fs.writeFileSync(path.join(outDir, 'expected.tsv'), lines.join('\n') + '\n');
console.log(`${outDir}: ${samples.length} samples, ${off} bytes; js-tiktoken != tiktoken on ${disagree} (all with U+0085/U+FEFF)`);
