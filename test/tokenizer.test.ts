import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CLIPTokenizer, normalizeText } from '../src/tokenizer';

/** Every folder a test writes, removed at the end (they used to pile up in the system's temp folder). */
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-tokenizer-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

// Golden ids from transformers' CLIPTokenizer: scripts/golden/make_tokenizer_fixture.py.
interface Case {
  text: string;
  ids: number[];
  padded: number[];
}

const VOCAB_DIR = path.join(__dirname, '..', 'assets', 'tiny-clip-tokenizer');
const CASES: Case[] = JSON.parse(
  fs.readFileSync(path.join(__dirname, 'fixtures', 'tokenizer', 'tiny_cases.json'), 'utf8'),
);
const BOS = 998;
const EOS = 999;

/** Makes a throw-away tokenizer folder: the tiny vocab plus `files` (null = leave out). */
function makeFolder(files: Record<string, string | null>): string {
  const dir = fs.mkdtempSync(path.join(tmpRoot, 'clip-tok-'));
  for (const name of ['vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json']) {
    if (!(name in files)) fs.copyFileSync(path.join(VOCAB_DIR, name), path.join(dir, name));
  }
  for (const [name, text] of Object.entries(files)) {
    if (text !== null) fs.writeFileSync(path.join(dir, name), text);
  }
  return dir;
}

const label = (text: string): string => JSON.stringify(text.length > 40 ? `${text.slice(0, 40)}…` : text);

describe('CLIPTokenizer on the tiny vocabulary', () => {
  const tok = CLIPTokenizer.fromFolder(VOCAB_DIR);
  const vocab: Record<string, number> = JSON.parse(fs.readFileSync(path.join(VOCAB_DIR, 'vocab.json'), 'utf8'));

  test('fixture covers the awkward cases', () => {
    expect(CASES.length).toBeGreaterThanOrEqual(60);
    expect(CASES.some((c) => c.ids.length > 77)).toBe(true);
    expect(CASES.some((c) => c.text === '')).toBe(true);
  });

  test('special ids and sizes', () => {
    expect(tok.bosTokenId).toBe(BOS);
    expect(tok.eosTokenId).toBe(EOS);
    expect(tok.padTokenId).toBe(EOS);
    expect(tok.vocabSize).toBe(1000);
    expect(tok.modelMaxLength).toBe(77);
  });

  test.each(CASES.map((c) => [label(c.text), c] as const))('encode %s', (_name, c) => {
    expect(tok.encode(c.text)).toEqual(c.ids);
  });

  test.each(CASES.map((c) => [label(c.text), c] as const))('encodeBatch max_length %s', (_name, c) => {
    expect(tok.encodeBatch([c.text])).toEqual([c.padded]);
    expect(tok.encodeBatch([c.text], { maxLength: 77, padding: 'max_length' })).toEqual([c.padded]);
  });

  test('tokenize agrees with encode', () => {
    for (const c of CASES) {
      expect(tok.tokenize(c.text).map((t) => vocab[t])).toEqual(c.ids.slice(1, -1));
    }
  });

  test('whole batch, max_length and longest padding', () => {
    const texts = CASES.map((c) => c.text);
    expect(tok.encodeBatch(texts)).toEqual(CASES.map((c) => c.padded));

    // make_tokenizer_fixture.py asserts that transformers' padding="longest" is exactly
    // this: truncate to 77 keeping eos last, then right-pad with pad to the longest row.
    const truncated = CASES.map((c) => (c.ids.length <= 77 ? c.ids : [...c.ids.slice(0, 76), EOS]));
    const width = Math.max(...truncated.map((r) => r.length));
    const expected = truncated.map((r) => [...r, ...new Array<number>(width - r.length).fill(EOS)]);
    expect(tok.encodeBatch(texts, { padding: 'longest' })).toEqual(expected);

    const short = CASES.filter((c) => c.ids.length < 20).map((c) => c.text);
    const rows = tok.encodeBatch(short, { padding: 'longest' });
    expect(new Set(rows.map((r) => r.length)).size).toBe(1);
    expect(rows[0].length).toBeLessThan(20);
  });

  test('custom maxLength truncates keeping bos and eos', () => {
    const c = CASES.find((x) => x.ids.length > 20)!;
    expect(tok.encodeBatch([c.text], { maxLength: 10 })).toEqual([[...c.ids.slice(0, 9), EOS]]);
    expect(tok.encodeBatch([''], { maxLength: 4 })).toEqual([[BOS, EOS, EOS, EOS]]);
    expect(() => tok.encodeBatch(['x'], { maxLength: 1 })).toThrow(/maxLength/);
  });

  test('normalization: NFC, Unicode white space, per-code-point lower-casing', () => {
    expect(normalizeText('Cafe\u0301')).toBe('caf\u00e9');
    expect(normalizeText('a \t\n\u0085\u3000b\ufeffc')).toBe('a b\ufeffc');
    expect(normalizeText('ΟΔΟΣ')).toBe('οδοσ'); // no final-sigma rule
    expect(normalizeText('\u212a')).toBe('k'); // Kelvin sign: NFC -> K, then lower
  });
});

describe('special-token matching follows transformers 5.x loading rules', () => {
  // Expected `normalized` flags of <|startoftext|> / <|endoftext|> were read off
  // CLIPTokenizer.from_pretrained(...).backend_tokenizer for each layout (transformers
  // 5.18). A normalized special is also found in lower-cased input, a raw one is not.
  const added = (content: string, normalized: boolean, withType = true): Record<string, unknown> => ({
    ...(withType ? { __type: 'AddedToken' } : {}),
    content,
    lstrip: false,
    normalized,
    rstrip: false,
    single_word: false,
  });
  const sdConfig = JSON.parse(fs.readFileSync(path.join(VOCAB_DIR, 'tokenizer_config.json'), 'utf8'));
  const sdMap = JSON.parse(fs.readFileSync(path.join(VOCAB_DIR, 'special_tokens_map.json'), 'utf8'));
  const S = '<|startoftext|>';
  const E = '<|endoftext|>';
  const decoderEntry = (content: string, normalized: boolean) => ({ ...added(content, normalized, false), special: true });

  const layouts: [string, Record<string, unknown> | null, Record<string, unknown> | null, boolean, boolean][] = [
    ['SD 1.5 files', sdConfig, sdMap, true, false],
    ['no config files', null, null, false, false],
    ['tokenizer_config.json only', sdConfig, null, true, false],
    ['special_tokens_map.json only', null, sdMap, true, false],
    ['pad_token as AddedToken', { ...sdConfig, pad_token: added(E, true) }, { ...sdMap, pad_token: added(E, true, false) }, true, true],
    ['bos_token as string', { ...sdConfig, bos_token: S }, { ...sdMap, bos_token: S }, false, false],
    // unk (string) is queued, pad (AddedToken equal to eos) is skipped as a duplicate
    [
      'unk_token as string',
      { ...sdConfig, unk_token: E, pad_token: added(E, true) },
      { ...sdMap, unk_token: E, pad_token: added(E, true, false) },
      true,
      false,
    ],
    [
      'eos_token as string',
      { ...sdConfig, eos_token: E, unk_token: added(E, true), pad_token: added(E, true) },
      { ...sdMap, eos_token: E, unk_token: added(E, true, false), pad_token: added(E, true, false) },
      true,
      true,
    ],
    [
      'added_tokens_decoder',
      { ...sdConfig, added_tokens_decoder: { '998': decoderEntry(S, true), '999': decoderEntry(E, true) } },
      sdMap,
      true,
      true,
    ],
    // with added_tokens_decoder, special_tokens_map.json is ignored: bos stays a string
    [
      'added_tokens_decoder without bos',
      { ...sdConfig, bos_token: S, added_tokens_decoder: { '999': decoderEntry(E, true) } },
      sdMap,
      false,
      true,
    ],
  ];

  test.each(layouts)('%s', (_name, config, map, bosNormalized, eosNormalized) => {
    const dir = makeFolder({
      'tokenizer_config.json': config && JSON.stringify(config),
      'special_tokens_map.json': map && JSON.stringify(map),
    });
    const tok = CLIPTokenizer.fromFolder(dir);
    // Exact-case specials always match, whichever pass finds them.
    expect(tok.encode(`${S}${E}`)).toEqual([BOS, BOS, EOS, EOS]);
    expect(tok.encode('<|STARTOFTEXT|>').includes(BOS, 1)).toBe(bosNormalized);
    expect(tok.encode('<|ENDOFTEXT|>').slice(0, -1).includes(EOS)).toBe(eosNormalized);
    expect(tok.modelMaxLength).toBe(77);
    fs.rmSync(dir, { recursive: true });
  });
});

describe('CLIPTokenizer.fromFolder errors', () => {
  const load = (files: Record<string, string | null>) => () => {
    const dir = makeFolder(files);
    try {
      CLIPTokenizer.fromFolder(dir);
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  };
  const merges = fs.readFileSync(path.join(VOCAB_DIR, 'merges.txt'), 'utf8');

  test('missing vocab.json', () => {
    expect(load({ 'vocab.json': null })).toThrow(/missing vocab\.json/);
  });
  test('missing merges.txt', () => {
    expect(load({ 'merges.txt': null })).toThrow(/missing merges\.txt/);
  });
  test('missing folder', () => {
    expect(() => CLIPTokenizer.fromFolder(path.join(os.tmpdir(), 'no-such-clip-tokenizer'))).toThrow(/vocab\.json/);
  });
  test('malformed vocab.json', () => {
    expect(load({ 'vocab.json': '{"a": 0,' })).toThrow(/malformed vocab\.json/);
    expect(load({ 'vocab.json': '["a"]' })).toThrow(/malformed vocab\.json/);
    expect(load({ 'vocab.json': '{"a": "zero"}' })).toThrow(/malformed vocab\.json.*"a"/);
  });
  test('malformed merges.txt: wrong number of fields', () => {
    expect(load({ 'merges.txt': '#version: 0.2\no f</w>\nr e x\n' })).toThrow(/malformed merges\.txt.*line 3/);
    expect(load({ 'merges.txt': '#version: 0.2\no f</w>\n\nr e\n' })).toThrow(/malformed merges\.txt.*line 3/);
  });
  test('malformed merges.txt: token not in the vocabulary', () => {
    expect(load({ 'merges.txt': '#version: 0.2\nq z\n' })).toThrow(/malformed merges\.txt.*"qz" is not in vocab\.json/);
  });
  test('merges.txt with CRLF line ends still loads', () => {
    expect(load({ 'merges.txt': merges.replace(/\n/g, '\r\n') })).not.toThrow();
  });
  test('malformed tokenizer_config.json / special_tokens_map.json', () => {
    expect(load({ 'tokenizer_config.json': '{' })).toThrow(/malformed tokenizer_config\.json/);
    expect(load({ 'special_tokens_map.json': '{"bos_token": 5}' })).toThrow(/malformed special_tokens_map\.json/);
  });
  test('special token missing from the vocabulary', () => {
    expect(load({ 'special_tokens_map.json': '{"bos_token": "<s>"}' })).toThrow(/"<s>" is not in vocab\.json/);
  });
});

// transformers 5's save_pretrained writes tokenizer.json (and tokenizer_config.json) only: no vocab.json / merges.txt.
// The folder is made by scripts/golden/make_tokenizer_json_fixture.py, which checks with transformers that it gives
// the golden ids too.
describe('a tokenizer folder with tokenizer.json only', () => {
  const JSON_DIR = path.join(__dirname, 'fixtures', 'tokenizer', 'tokenizer-json');
  const fast = CLIPTokenizer.fromFolder(JSON_DIR);
  const slow = CLIPTokenizer.fromFolder(VOCAB_DIR);

  test('the fixture has no vocab.json or merges.txt', () => {
    expect(fs.readdirSync(JSON_DIR).sort()).toEqual(['tokenizer.json', 'tokenizer_config.json']);
  });

  test('same special ids and sizes as the vocab.json / merges.txt tokenizer', () => {
    expect([fast.bosTokenId, fast.eosTokenId, fast.padTokenId, fast.vocabSize, fast.modelMaxLength]).toEqual([
      slow.bosTokenId, slow.eosTokenId, slow.padTokenId, slow.vocabSize, slow.modelMaxLength,
    ]);
  });

  test.each(CASES.map((c) => [label(c.text), c] as const))('golden ids %s', (_name, c) => {
    expect(fast.encode(c.text)).toEqual(c.ids);
    expect(fast.encodeBatch([c.text])).toEqual([c.padded]);
  });

  test('merges written as "a b" strings (older tokenizers) load the same', () => {
    const j = JSON.parse(fs.readFileSync(path.join(JSON_DIR, 'tokenizer.json'), 'utf8'));
    j.model.merges = (j.model.merges as string[][]).map((m) => m.join(' '));
    const dir = fs.mkdtempSync(path.join(tmpRoot, 'clip-tokjson-'));
    fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(j));
    fs.copyFileSync(path.join(JSON_DIR, 'tokenizer_config.json'), path.join(dir, 'tokenizer_config.json'));
    const t = CLIPTokenizer.fromFolder(dir);
    for (const c of CASES) expect(t.encode(c.text)).toEqual(c.ids);
  });

  test('a tokenizer.json of another kind is refused', () => {
    const j = JSON.parse(fs.readFileSync(path.join(JSON_DIR, 'tokenizer.json'), 'utf8'));
    const write = (mutate: (x: any) => void): string => {
      const copy = JSON.parse(JSON.stringify(j));
      mutate(copy);
      const dir = fs.mkdtempSync(path.join(tmpRoot, 'clip-tokjson-'));
      fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(copy));
      return dir;
    };
    expect(() => CLIPTokenizer.fromFolder(write((x) => (x.model.type = 'WordPiece')))).toThrow(/not a CLIP BPE/);
    expect(() => CLIPTokenizer.fromFolder(write((x) => (x.model.end_of_word_suffix = null)))).toThrow(/<\/w>/);
    expect(() => CLIPTokenizer.fromFolder(write((x) => (x.normalizer = null, x.pre_tokenizer = { type: 'Whitespace' })))).toThrow(/pre-tokenizer/);
    expect(() => CLIPTokenizer.fromFolder(write((x) => (x.model.merges = [['q', 'z']])))).toThrow(/"qz" is not in/);
  });
});

// The CLIP ViT-L/14 tokenizer that ships for single-file checkpoints (assets/clip-tokenizer, scripts/make-clip-tokenizer.py,
// which checks it against open_clip's original tokenizer and writes transformers' ids for these texts).
describe('assets/clip-tokenizer (49408 tokens)', () => {
  const tok = CLIPTokenizer.fromFolder(path.join(__dirname, '..', 'assets', 'clip-tokenizer'));
  const cases: Array<{ text: string; ids: number[] }> = JSON.parse(fs.readFileSync(path.join(__dirname, 'fixtures', 'tokenizer', 'clip_cases.json'), 'utf8'));
  test('sizes and special ids of SD 1.5\'s tokenizer', () => {
    expect([tok.vocabSize, tok.bosTokenId, tok.eosTokenId, tok.padTokenId, tok.modelMaxLength]).toEqual([49408, 49406, 49407, 49407, 77]);
  });
  test.each(cases.map((c) => [label(c.text), c] as const))('transformers ids %s', (_name, c) => {
    expect(tok.encode(c.text)).toEqual(c.ids);
  });
});
