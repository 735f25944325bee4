/**
 * CLIP byte-level BPE tokenizer, a dependency-free port of `transformers.CLIPTokenizer`
 * (transformers 5.x, where the class is a thin wrapper around a `tokenizers` pipeline).
 *
 * The ids it produces match `CLIPTokenizer.from_pretrained(dir)(text).input_ids` exactly;
 * test/tokenizer.test.ts checks that against golden ids written by
 * scripts/golden/make_tokenizer_fixture.py.
 *
 * Pipeline, in the order transformers/tokenizers run it:
 *
 *  1. Added (special) tokens are cut out of the text first. Tokens flagged
 *     `normalized: false` are matched in the raw text, the ones flagged
 *     `normalized: true` in the normalized text (see `resolveSpecialTokens` for how
 *     transformers decides the flag; with the SD 1.5 files `<|endoftext|>` ends up raw
 *     and `<|startoftext|>` normalized, so "<|STARTOFTEXT|>" is special but
 *     "<|ENDOFTEXT|>" is ordinary text).
 *  2. Normalizer: NFC, then every run of Unicode white space -> one " ", then
 *     lower-casing one code point at a time (no Final_Sigma rule: "Σ" -> "σ" always).
 *     No ftfy, no HTML unescaping, no stripping, no accent removal, no CJK splitting.
 *  3. Pre-tokenizer: CLIP's regex keeps its matches and drops everything between them
 *     (only white space falls between), then ByteLevel splits each piece again with
 *     GPT-2's regex (only matters for "<|endoftext|>" and friends when they were not
 *     cut out in step 1) and maps UTF-8 bytes to CLIP's printable byte characters.
 *  4. BPE with "</w>" appended to the last symbol of every word; symbols missing from
 *     the vocabulary become the unk token (one per symbol, no fusing).
 *  5. Post-processor: bos + ids + eos.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Options for {@link CLIPTokenizer.encodeBatch}. */
export interface EncodeBatchOptions {
  /** Length to truncate to (eos kept last) and, with padding 'max_length', pad to.
   * Defaults to {@link CLIPTokenizer.modelMaxLength}. */
  maxLength?: number;
  /** 'max_length' (default) pads every row to maxLength; 'longest' pads to the longest
   * row of the batch after truncation. */
  padding?: 'max_length' | 'longest';
}

/** An added (special) token as the backend tokenizer sees it. */
interface AddedTokenSpec {
  content: string;
  id: number;
  /** Matched in the normalized text (true) or in the raw input (false). */
  normalized: boolean;
}

/** A special token declaration: a bare string or a serialized `AddedToken`. */
type TokenDecl =
  | { kind: 'string'; content: string }
  | {
      kind: 'added';
      content: string;
      normalized: boolean;
      special: boolean;
      lstrip: boolean;
      rstrip: boolean;
      singleWord: boolean;
    };

type SpecialKey = 'bos_token' | 'eos_token' | 'unk_token' | 'pad_token';
/** Same order as transformers' SPECIAL_TOKENS_ATTRIBUTES (sep/cls/mask unused by CLIP). */
const SPECIAL_KEYS: readonly SpecialKey[] = ['bos_token', 'eos_token', 'unk_token', 'pad_token'];

/** transformers' CLIPTokenizer constructor defaults. */
const CLIP_DEFAULTS: Record<SpecialKey, string> = {
  bos_token: '<|startoftext|>',
  eos_token: '<|endoftext|>',
  unk_token: '<|endoftext|>',
  pad_token: '<|endoftext|>',
};

/** CLIP's text encoder has 77 positions; used when the config gives no usable limit. */
const DEFAULT_MAX_LENGTH = 77;
const END_OF_WORD = '</w>';
const BPE_CACHE_LIMIT = 10_000;

// Both regexes run on already lower-cased text. `\s` in the original (Oniguruma) patterns
// means the Unicode White_Space property, which is *not* JavaScript's `\s`: JS adds U+FEFF
// and lacks U+0085, so `\p{White_Space}` is spelled out explicitly.

/** CLIP's pre-tokenization pattern (`pre_tokenizers.Split(..., invert=True, "removed")`). */
const CLIP_PATTERN =
  /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\p{White_Space}\p{L}\p{N}]+/gu;

/** GPT-2's pattern, applied by `pre_tokenizers.ByteLevel(use_regex=True)` to every piece. */
const BYTE_LEVEL_PATTERN =
  /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\p{White_Space}\p{L}\p{N}]+|\p{White_Space}+(?!\P{White_Space})|\p{White_Space}+/gu;

const WHITE_SPACE_RUN = /\p{White_Space}+/gu;

/**
 * CLIP's / GPT-2's `bytes_to_unicode()`: byte value -> printable character. Printable
 * Latin-1 bytes map to themselves, the other 68 bytes to U+0100, U+0101, ... in order.
 */
function bytesToUnicode(): string[] {
  const table = new Array<string>(256);
  const printable = (b: number): boolean =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let next = 0;
  for (let b = 0; b < 256; b++) {
    table[b] = String.fromCodePoint(printable(b) ? b : 256 + next++);
  }
  return table;
}

const BYTE_ENCODER = bytesToUnicode();

/**
 * The normalizer of transformers' CLIPTokenizer:
 * `Sequence([NFC(), Replace(Regex(r"\s+"), " "), Lowercase()])`.
 *
 * tokenizers lower-cases with Rust's `char::to_lowercase`, one code point at a time, so
 * context-sensitive rules do not apply: `"ΟΔΟΣ"` -> `"οδοσ"` (JS's `toLowerCase()` on the
 * whole string would give the final sigma `"οδος"`). `"İ"` still becomes `"i̇"` in both.
 */
export function normalizeText(text: string): string {
  const collapsed = text.normalize('NFC').replace(WHITE_SPACE_RUN, ' ');
  let out = '';
  for (const ch of collapsed) out += ch.toLowerCase();
  return out;
}

/** One piece of input: either still text, or an already resolved added-token id. */
type Segment = { text: string } | { added: AddedTokenSpec };

/**
 * Splits `text` around occurrences of `tokens`, scanning left to right and taking the
 * leftmost, then longest, match (tokenizers' aho-corasick `LeftmostLongest`).
 */
function splitOnAddedTokens(text: string, tokens: readonly AddedTokenSpec[]): Segment[] {
  if (tokens.length === 0) return [{ text }];
  const out: Segment[] = [];
  let pos = 0;
  while (pos < text.length) {
    let best: AddedTokenSpec | undefined;
    let bestAt = -1;
    for (const tok of tokens) {
      const at = text.indexOf(tok.content, pos);
      if (at < 0) continue;
      if (bestAt < 0 || at < bestAt || (at === bestAt && tok.content.length > best!.content.length)) {
        best = tok;
        bestAt = at;
      }
    }
    if (best === undefined) break;
    if (bestAt > pos) out.push({ text: text.slice(pos, bestAt) });
    out.push({ added: best });
    pos = bestAt + best.content.length;
  }
  if (pos < text.length) out.push({ text: text.slice(pos) });
  return out;
}

function readRequired(dir: string, name: string): string {
  const file = path.join(dir, name);
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new Error(`CLIPTokenizer: missing ${name} in ${dir}`);
    throw new Error(`CLIPTokenizer: cannot read ${file}: ${(err as Error).message}`);
  }
}

function readOptionalJson(dir: string, name: string): Record<string, unknown> | undefined {
  const file = path.join(dir, name);
  if (!fs.existsSync(file)) return undefined;
  return parseJsonObject(fs.readFileSync(file, 'utf8'), file);
}

function parseJsonObject(text: string, file: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new Error(`CLIPTokenizer: malformed ${path.basename(file)} (${file}): ${(err as Error).message}`);
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new Error(`CLIPTokenizer: malformed ${path.basename(file)} (${file}): expected a JSON object`);
  }
  return value as Record<string, unknown>;
}

function parseVocab(text: string, file: string): Map<string, number> {
  const obj = parseJsonObject(text, file);
  const vocab = new Map<string, number>();
  for (const [token, id] of Object.entries(obj)) {
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0) {
      throw new Error(
        `CLIPTokenizer: malformed vocab.json (${file}): id of ${JSON.stringify(token)} is not a non-negative integer`,
      );
    }
    vocab.set(token, id);
  }
  if (vocab.size === 0) throw new Error(`CLIPTokenizer: malformed vocab.json (${file}): empty vocabulary`);
  return vocab;
}

/**
 * Parses merges.txt the way tokenizers' `convert_merges_to_hashmap` does: lines starting
 * with "#version" are skipped, every other line must be exactly two tokens separated by
 * one space (a blank line is an error, except the end of a final newline), and both parts
 * and their concatenation must be in the vocabulary. A repeated pair keeps its last rank.
 * Returns "left right" -> rank.
 */
function parseMerges(text: string, file: string, vocab: ReadonlyMap<string, number>): Map<string, number> {
  const lines = text.split('\n');
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  const ranks = new Map<string, number>();
  let rank = 0;
  lines.forEach((raw, index) => {
    const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    if (line.startsWith('#version')) return;
    const where = `merges.txt (${file}) line ${index + 1}`;
    const parts = line.split(' ');
    if (parts.length !== 2 || parts[0] === '' || parts[1] === '') {
      throw new Error(`CLIPTokenizer: malformed ${where}: expected "left right", got ${JSON.stringify(line)}`);
    }
    for (const tok of [parts[0], parts[1], parts[0] + parts[1]]) {
      if (!vocab.has(tok)) {
        throw new Error(`CLIPTokenizer: malformed ${where}: token ${JSON.stringify(tok)} is not in vocab.json`);
      }
    }
    ranks.set(`${parts[0]} ${parts[1]}`, rank++);
  });
  return ranks;
}

/** The tokenizer.json pipeline of a CLIP tokenizer, as tokenizers serializes it (checked, so another kind is refused). */
const CLIP_NORMALIZER = JSON.stringify({
  type: 'Sequence',
  normalizers: [{ type: 'NFC' }, { type: 'Replace', pattern: { Regex: '\\s+' }, content: ' ' }, { type: 'Lowercase' }],
});

/**
 * Reads a tokenizers `tokenizer.json` of a CLIP tokenizer: model.vocab (token -> id), model.merges (["a", "b"] pairs,
 * or "a b" strings as older tokenizers wrote them) and added_tokens. The rest of the pipeline must be CLIP's
 * (normalizer, Split + ByteLevel pre-tokenizer, BPE with "</w>"), which this class implements; anything else is refused.
 */
function parseTokenizerJson(file: string): {
  vocab: Map<string, number>;
  ranks: Map<string, number>;
  added: Array<Record<string, unknown>>;
} {
  const j = parseJsonObject(fs.readFileSync(file, 'utf8'), file);
  const bad = (what: string): Error => new Error(`CLIPTokenizer: ${file}: ${what}`);
  const model = j.model as Record<string, unknown> | undefined;
  if (!model || typeof model !== 'object') throw bad('has no "model" object');
  if (model.type !== undefined && model.type !== 'BPE') throw bad(`model type ${JSON.stringify(model.type)} is not a CLIP BPE tokenizer`);
  if (model.end_of_word_suffix !== '</w>') throw bad('is not a CLIP tokenizer (its BPE has no "</w>" end-of-word suffix)');
  if (model.continuing_subword_prefix) throw bad('is not a CLIP tokenizer (continuing_subword_prefix is set)');
  if (model.byte_fallback) throw bad('is not a CLIP tokenizer (byte_fallback is set)');
  if (model.dropout != null) throw bad('BPE dropout is not supported');
  if (j.normalizer != null && JSON.stringify(j.normalizer) !== CLIP_NORMALIZER)
    throw bad(`its normalizer is not CLIP's (NFC, white space -> " ", lower case): ${JSON.stringify(j.normalizer)}`);
  const pre = j.pre_tokenizer as { type?: string; pretokenizers?: Array<{ type?: string }> } | undefined;
  const preTypes = pre?.type === 'Sequence' ? (pre.pretokenizers ?? []).map((p) => p.type).join(',') : pre?.type;
  if (preTypes !== 'Split,ByteLevel') throw bad(`its pre-tokenizer is not CLIP's (Split, ByteLevel), got ${preTypes ?? 'none'}`);
  const vocab = parseVocab(JSON.stringify(model.vocab ?? null), `${file} model.vocab`);
  if (!Array.isArray(model.merges)) throw bad('model.merges must be a list');
  const lines = (model.merges as unknown[]).map((m, i) => {
    if (typeof m === 'string') return m;
    if (Array.isArray(m) && m.length === 2 && typeof m[0] === 'string' && typeof m[1] === 'string') return `${m[0]} ${m[1]}`;
    throw bad(`model.merges[${i}] must be ["left", "right"] or "left right"`);
  });
  const ranks = parseMerges(lines.join('\n'), `${file} model.merges`, vocab);
  const added = j.added_tokens === undefined ? [] : j.added_tokens;
  if (!Array.isArray(added)) throw bad('added_tokens must be a list');
  return { vocab, ranks, added: added as Array<Record<string, unknown>> };
}

/** Reads a special-token entry the way transformers' `from_pretrained` does. */
function parseTokenDecl(value: unknown, where: string, fromSpecialTokensMap: boolean): TokenDecl {
  if (typeof value === 'string') return { kind: 'string', content: value };
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const v = value as Record<string, unknown>;
    if (typeof v.content !== 'string') throw new Error(`CLIPTokenizer: malformed ${where}: "content" must be a string`);
    const flag = (name: string, dflt: boolean): boolean => {
      if (v[name] === undefined) return dflt;
      if (typeof v[name] !== 'boolean') throw new Error(`CLIPTokenizer: malformed ${where}: "${name}" must be a boolean`);
      return v[name] as boolean;
    };
    // special_tokens_map.json entries become AddedToken(**value, special=True); config
    // entries AddedToken(**value). AddedToken's `normalized` defaults to `not special`.
    const special = fromSpecialTokensMap ? true : flag('special', false);
    return {
      kind: 'added',
      content: v.content,
      special,
      normalized: flag('normalized', !special),
      lstrip: flag('lstrip', false),
      rstrip: flag('rstrip', false),
      singleWord: flag('single_word', false),
    };
  }
  throw new Error(`CLIPTokenizer: malformed ${where}: expected a string or an AddedToken object`);
}

function sameDecl(a: TokenDecl, b: TokenDecl): boolean {
  if (a.kind === 'string' || b.kind === 'string') return a.kind === b.kind && a.content === b.content;
  return (
    a.content === b.content &&
    a.normalized === b.normalized &&
    a.special === b.special &&
    a.lstrip === b.lstrip &&
    a.rstrip === b.rstrip &&
    a.singleWord === b.singleWord
  );
}

/**
 * Decides the special tokens and their `normalized` flags exactly like transformers 5.x
 * (`PreTrainedTokenizerBase.from_pretrained` + `TokenizersBackend.__init__`):
 *
 *  - Defaults are CLIPTokenizer's bare strings. tokenizer_config.json overrides them. If it
 *    has `added_tokens_decoder`, those entries are added first and win; otherwise
 *    special_tokens_map.json (when present) overrides the config per key.
 *  - The bos/eos/unk/pad declarations are then added in that order, skipping a declaration
 *    equal to one already queued (a bare string never equals an AddedToken). A bare string
 *    becomes AddedToken(special=True), i.e. normalized=false.
 *  - Adding the same content twice keeps the last declaration's flags.
 *
 * With the SD 1.5 files this yields `<|startoftext|>` normalized=true (from its AddedToken)
 * but `<|endoftext|>` normalized=false (the bare-string pad_token comes last).
 */
function resolveSpecialTokens(
  config: Record<string, unknown> | undefined,
  specialMap: Record<string, unknown> | undefined,
  vocab: ReadonlyMap<string, number>,
): { names: Record<SpecialKey, string>; added: AddedTokenSpec[] } {
  const decls: Record<SpecialKey, TokenDecl> = {
    bos_token: { kind: 'string', content: CLIP_DEFAULTS.bos_token },
    eos_token: { kind: 'string', content: CLIP_DEFAULTS.eos_token },
    unk_token: { kind: 'string', content: CLIP_DEFAULTS.unk_token },
    pad_token: { kind: 'string', content: CLIP_DEFAULTS.pad_token },
  };
  for (const key of SPECIAL_KEYS) {
    if (config?.[key] != null) decls[key] = parseTokenDecl(config[key], `tokenizer_config.json "${key}"`, false);
  }

  const queued: TokenDecl[] = [];
  const decoder = config?.added_tokens_decoder;
  if (decoder !== undefined) {
    if (decoder === null || typeof decoder !== 'object' || Array.isArray(decoder)) {
      throw new Error('CLIPTokenizer: malformed tokenizer_config.json: "added_tokens_decoder" must be an object');
    }
    const entries = Object.entries(decoder as Record<string, unknown>).sort(([a], [b]) => Number(a) - Number(b));
    for (const [id, value] of entries) {
      queued.push(parseTokenDecl(value, `tokenizer_config.json added_tokens_decoder[${id}]`, false));
    }
  } else if (specialMap !== undefined) {
    for (const key of SPECIAL_KEYS) {
      if (specialMap[key] != null) decls[key] = parseTokenDecl(specialMap[key], `special_tokens_map.json "${key}"`, true);
    }
  }
  const fromDecoder = new Set(queued.map((d) => d.content));
  for (const key of SPECIAL_KEYS) {
    const decl = decls[key];
    if (fromDecoder.has(decl.content)) continue; // already an added token: its flags win
    if (!queued.some((q) => sameDecl(q, decl))) queued.push(decl);
  }

  const byContent = new Map<string, AddedTokenSpec>();
  for (const decl of queued) {
    if (decl.kind === 'added' && (decl.lstrip || decl.rstrip || decl.singleWord)) {
      throw new Error(
        `CLIPTokenizer: added token ${JSON.stringify(decl.content)} uses lstrip/rstrip/single_word, which is not supported`,
      );
    }
    const id = vocab.get(decl.content);
    if (id === undefined) {
      throw new Error(`CLIPTokenizer: special token ${JSON.stringify(decl.content)} is not in vocab.json`);
    }
    // Map insertion keeps the first position, assignment keeps the last flags.
    byContent.set(decl.content, { content: decl.content, id, normalized: decl.kind === 'added' && decl.normalized });
  }
  const names = Object.fromEntries(SPECIAL_KEYS.map((k) => [k, decls[k].content])) as Record<SpecialKey, string>;
  return { names, added: [...byContent.values()] };
}

/** A CLIP BPE tokenizer reproducing transformers' `CLIPTokenizer` ids. */
export class CLIPTokenizer {
  private readonly bosId: number;
  private readonly eosId: number;
  private readonly padId: number;
  private readonly unkToken: string;
  /** Added tokens matched in the raw input / in the normalized text (pipeline step 1). */
  private readonly rawAdded: AddedTokenSpec[];
  private readonly normalizedAdded: AddedTokenSpec[];
  /** Pre-token -> BPE tokens; cleared when it reaches BPE_CACHE_LIMIT entries. */
  private readonly cache = new Map<string, string[]>();

  private constructor(
    private readonly vocab: ReadonlyMap<string, number>,
    /** "left right" -> merge rank (lower merges first). */
    private readonly bpeRanks: ReadonlyMap<string, number>,
    specialTokens: ReturnType<typeof resolveSpecialTokens>,
    private readonly maxLength: number,
  ) {
    const { names, added } = specialTokens;
    // resolveSpecialTokens has checked that every special token is in the vocabulary.
    this.bosId = vocab.get(names.bos_token)!;
    this.eosId = vocab.get(names.eos_token)!;
    this.padId = vocab.get(names.pad_token)!;
    this.unkToken = names.unk_token;
    this.rawAdded = added.filter((t) => !t.normalized);
    // Normalized added tokens are searched for in normalized text, so their own content is
    // normalized too (a no-op for CLIP's lower-case specials).
    this.normalizedAdded = added
      .filter((t) => t.normalized)
      .map((t) => ({ ...t, content: normalizeText(t.content) }))
      .filter((t) => t.content !== '');
  }

  /**
   * Loads a Hugging Face CLIP tokenizer folder: vocab.json and merges.txt, or (without them) tokenizer.json,
   * which transformers 5 writes instead; tokenizer_config.json and special_tokens_map.json are optional, as in
   * transformers.
   */
  static fromFolder(dir: string): CLIPTokenizer {
    let vocab: Map<string, number>;
    let ranks: Map<string, number>;
    let config = readOptionalJson(dir, 'tokenizer_config.json');
    const hasSlowFiles = fs.existsSync(path.join(dir, 'vocab.json')) || fs.existsSync(path.join(dir, 'merges.txt'));
    if (!hasSlowFiles && fs.existsSync(path.join(dir, 'tokenizer.json'))) {
      // transformers 5's save_pretrained writes tokenizer.json only: the same BPE, vocabulary and merges inside.
      const fast = parseTokenizerJson(path.join(dir, 'tokenizer.json'));
      vocab = fast.vocab;
      ranks = fast.ranks;
      // Its added tokens are what the backend tokenizer starts with: they come first, as added_tokens_decoder does.
      if (config?.added_tokens_decoder === undefined && fast.added.length)
        config = { ...(config ?? {}), added_tokens_decoder: Object.fromEntries(fast.added.map((t) => [String(t.id), t])) };
    } else {
      vocab = parseVocab(readRequired(dir, 'vocab.json'), path.join(dir, 'vocab.json'));
      ranks = parseMerges(readRequired(dir, 'merges.txt'), path.join(dir, 'merges.txt'), vocab);
    }
    const specialMap = readOptionalJson(dir, 'special_tokens_map.json');
    const special = resolveSpecialTokens(config, specialMap, vocab);

    // transformers falls back to 1e30 ("no limit") without model_max_length; CLIP's text
    // encoder has 77 positions, so we use that instead of an unusable limit.
    const configured = config?.model_max_length;
    let maxLength = DEFAULT_MAX_LENGTH;
    if (configured !== undefined && configured !== null) {
      if (typeof configured !== 'number' || !(configured > 0)) {
        throw new Error('CLIPTokenizer: malformed tokenizer_config.json: "model_max_length" must be a positive number');
      }
      if (Number.isSafeInteger(configured)) maxLength = configured;
    }
    return new CLIPTokenizer(vocab, ranks, special, maxLength);
  }

  get bosTokenId(): number {
    return this.bosId;
  }
  get eosTokenId(): number {
    return this.eosId;
  }
  get padTokenId(): number {
    return this.padId;
  }
  /** Number of entries in vocab.json (all CLIP specials live inside it). */
  get vocabSize(): number {
    return this.vocab.size;
  }
  /** tokenizer_config.json's model_max_length, or 77 when absent or unbounded. */
  get modelMaxLength(): number {
    return this.maxLength;
  }

  /** Tokens (vocabulary strings) of `text`, without bos/eos. */
  tokenize(text: string): string[] {
    const out: string[] = [];
    this.run(
      text,
      (tok) => out.push(tok),
      (added) => out.push(added.content),
    );
    return out;
  }

  /** bos + ids of `text` + eos; no truncation, no padding. */
  encode(text: string): number[] {
    const ids = [this.bosId];
    this.run(
      text,
      (tok) => ids.push(this.vocab.get(tok) ?? this.vocab.get(this.unkToken)!),
      (added) => ids.push(added.id),
    );
    ids.push(this.eosId);
    return ids;
  }

  /**
   * Batch encoding equal to `tokenizer(texts, padding=..., max_length=maxLength,
   * truncation=True).input_ids`: the content is cut to maxLength - 2 tokens so that bos and
   * eos always survive, then rows are right-padded with the pad token.
   */
  encodeBatch(texts: string[], opts: EncodeBatchOptions = {}): number[][] {
    const maxLength = opts.maxLength ?? this.modelMaxLength;
    const padding = opts.padding ?? 'max_length';
    if (!Number.isSafeInteger(maxLength) || maxLength < 2) {
      throw new RangeError(`CLIPTokenizer.encodeBatch: maxLength must be an integer >= 2, got ${maxLength}`);
    }
    if (padding !== 'max_length' && padding !== 'longest') {
      throw new RangeError(`CLIPTokenizer.encodeBatch: unknown padding ${JSON.stringify(padding)}`);
    }
    const rows = texts.map((text) => {
      const ids = this.encode(text);
      return ids.length <= maxLength ? ids : [...ids.slice(0, maxLength - 1), this.eosId];
    });
    const width = padding === 'max_length' ? maxLength : rows.reduce((w, r) => Math.max(w, r.length), 0);
    return rows.map((r) => (r.length < width ? r.concat(new Array<number>(width - r.length).fill(this.padId)) : r));
  }

  /** Runs steps 1-4 of the pipeline, reporting BPE tokens and added-token ids in order. */
  private run(text: string, onToken: (tok: string) => void, onAdded: (tok: AddedTokenSpec) => void): void {
    for (const raw of splitOnAddedTokens(text, this.rawAdded)) {
      if ('added' in raw) {
        onAdded(raw.added);
        continue;
      }
      for (const seg of splitOnAddedTokens(normalizeText(raw.text), this.normalizedAdded)) {
        if ('added' in seg) {
          onAdded(seg.added);
          continue;
        }
        for (const piece of seg.text.match(CLIP_PATTERN) ?? []) {
          for (const word of piece.match(BYTE_LEVEL_PATTERN) ?? []) {
            for (const tok of this.bpe(word)) onToken(tok);
          }
        }
      }
    }
  }

  /** BPE of one pre-token; returns vocabulary strings (unknown symbols -> unk token). */
  private bpe(word: string): string[] {
    const cached = this.cache.get(word);
    if (cached) return cached;

    let encoded = '';
    for (const byte of Buffer.from(word, 'utf8')) encoded += BYTE_ENCODER[byte];
    // Every byte character is a single UTF-16 unit, so indexing by code unit is safe.
    const symbols = encoded.split('');
    symbols[symbols.length - 1] += END_OF_WORD;

    // Repeatedly merge the lowest-ranked adjacent pair, all its occurrences left to right.
    // (tokenizers merges one occurrence at a time through a priority queue ordered by
    // (rank, position); a merge can never recreate its own pair, so the result is equal.)
    while (symbols.length > 1) {
      let bestRank = Infinity;
      let bestLeft = '';
      let bestRight = '';
      for (let i = 0; i < symbols.length - 1; i++) {
        const rank = this.bpeRanks.get(`${symbols[i]} ${symbols[i + 1]}`);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          bestLeft = symbols[i];
          bestRight = symbols[i + 1];
        }
      }
      if (bestRank === Infinity) break;
      for (let i = 0; i < symbols.length - 1; i++) {
        if (symbols[i] === bestLeft && symbols[i + 1] === bestRight) {
          symbols.splice(i, 2, bestLeft + bestRight);
        }
      }
    }

    const tokens = symbols.map((s) => (this.vocab.has(s) ? s : this.unkToken));
    if (this.cache.size >= BPE_CACHE_LIMIT) this.cache.clear();
    this.cache.set(word, tokens);
    return tokens;
  }
}
