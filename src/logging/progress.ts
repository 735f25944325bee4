/**
 * A terminal progress bar (training steps or denoising steps) that shares the terminal with log
 * lines: every write goes through a `Terminal`, which lifts the bar out of the way (clear line),
 * writes the log text, and redraws the bar below it. When the bar's stream is not a TTY nothing is
 * drawn at all (the JSON logs / metrics.jsonl carry the numbers), but rates are still tracked.
 */

/** The part of a tty.WriteStream the bar needs (tests pass a fake). */
export interface TermStream {
  write(chunk: string): boolean;
  isTTY?: boolean;
  columns?: number;
}

const CLEAR_LINE = '\r\x1b[2K';

/**
 * Serializes output to one terminal: a single status line (the bar) plus ordinary text.
 * Both stdout and stderr usually land on the same screen, so one Terminal covers both.
 */
export class Terminal {
  private status: { stream: TermStream; text: string } | null = null;

  /** Writes `text` (whole lines) to `stream`; a visible status line is cleared first and redrawn after. */
  write(stream: TermStream, text: string): void {
    const st = this.status;
    if (st) st.stream.write(CLEAR_LINE);
    stream.write(text);
    if (st) st.stream.write(st.text);
  }

  /** Shows (or replaces) the status line; `text` must not contain newlines. */
  setStatus(stream: TermStream, text: string): void {
    if (this.status && this.status.stream !== stream) this.status.stream.write(CLEAR_LINE);
    this.status = { stream, text };
    stream.write(CLEAR_LINE + text);
  }

  /** Leaves the current status line on screen (ends it with a newline) and forgets it. */
  releaseStatus(): void {
    if (this.status) this.status.stream.write('\n');
    this.status = null;
  }

  /** Erases the status line and forgets it. */
  clearStatus(): void {
    if (this.status) this.status.stream.write(CLEAR_LINE);
    this.status = null;
  }

  get hasStatus(): boolean {
    return this.status !== null;
  }
}

let sharedTerminal: Terminal | null = null;
/** The process-wide Terminal that the default logger and progress bars share. */
export function defaultTerminal(): Terminal {
  sharedTerminal ??= new Terminal();
  return sharedTerminal;
}

/** Exponential moving average with bias correction (so early values are not pulled toward 0). */
class Ema {
  private acc = 0;
  private calls = 0;
  constructor(private readonly alpha: number) {}
  update(x: number): void {
    this.acc = this.alpha * x + (1 - this.alpha) * this.acc;
    this.calls++;
  }
  get value(): number {
    return this.calls === 0 ? NaN : this.acc / (1 - (1 - this.alpha) ** this.calls);
  }
}

export interface ProgressMetrics {
  loss?: number;
  lr?: number;
}

export interface ProgressOptions {
  total: number;
  /** Leading label, e.g. "Steps" or "Denoising". */
  label?: string;
  /** Unit for the rate, default "it" (→ it/s, or s/it when slower than 1/s). */
  unit?: string;
  /** Where the bar is drawn; default process.stderr. */
  stream?: TermStream;
  terminal?: Terminal;
  /** Position to start from (resumed training); rates only count progress made here. */
  initial?: number;
  /** Redraw at most this often (ms), default 100; the final step always draws. */
  minIntervalMs?: number;
  /** EMA weight of the newest rate sample (default 0.3) and loss sample (default 0.1). */
  rateSmoothing?: number;
  lossSmoothing?: number;
  /** Force drawing on/off; default: stream.isTTY. */
  enabled?: boolean;
  /** Clock in ms (tests). */
  now?: () => number;
}

/** 00:42, 12:03, 1:02:03 */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${String(m).padStart(2, '0')}:${ss}`;
}

const BLOCKS = ['', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];

function drawBar(fraction: number, width: number): string {
  const f = Math.min(1, Math.max(0, fraction));
  const eighths = Math.floor(f * width * 8);
  const full = Math.floor(eighths / 8);
  const part = full < width ? BLOCKS[eighths % 8] : '';
  return ('█'.repeat(full) + part).padEnd(width, ' ');
}

export class ProgressBar {
  readonly total: number;
  readonly enabled: boolean;
  private readonly label: string;
  private readonly unit: string;
  private readonly stream: TermStream;
  private readonly terminal: Terminal;
  private readonly minIntervalMs: number;
  private readonly now: () => number;
  private readonly startMs: number;
  private readonly secPerIt: Ema;
  private readonly lossEma: Ema;
  private n: number;
  private lastN: number;
  private lastMs: number;
  private lastDrawMs = -Infinity;
  private lr: number | undefined;
  private finished = false;

  constructor(o: ProgressOptions) {
    if (!Number.isSafeInteger(o.total) || o.total < 0) throw new RangeError(`progress total must be a non-negative integer, got ${o.total}`);
    this.total = o.total;
    this.label = o.label ?? '';
    this.unit = o.unit ?? 'it';
    this.stream = o.stream ?? process.stderr;
    this.terminal = o.terminal ?? defaultTerminal();
    this.minIntervalMs = o.minIntervalMs ?? 100;
    this.now = o.now ?? (() => performance.now());
    this.enabled = o.enabled ?? this.stream.isTTY === true;
    this.secPerIt = new Ema(o.rateSmoothing ?? 0.3);
    this.lossEma = new Ema(o.lossSmoothing ?? 0.1);
    this.n = this.lastN = o.initial ?? 0;
    this.startMs = this.lastMs = this.now();
    if (this.enabled) this.draw(true);
  }

  /** Smoothed rate in units per second (NaN before the first advance). */
  get rate(): number {
    return 1 / this.secPerIt.value;
  }

  /** Smoothed loss (NaN before the first loss); non-finite losses are not averaged in. */
  get smoothedLoss(): number {
    return this.lossEma.value;
  }

  get position(): number {
    return this.n;
  }

  /** Moves to absolute position `n` (e.g. global_step) and records metrics. */
  update(n: number, metrics: ProgressMetrics = {}): void {
    const t = this.now();
    const dn = n - this.lastN;
    if (dn > 0) {
      const dt = (t - this.lastMs) / 1000;
      if (dt > 0) this.secPerIt.update(dt / dn);
      this.lastN = n;
      this.lastMs = t;
    }
    this.n = n;
    if (metrics.loss !== undefined && Number.isFinite(metrics.loss)) this.lossEma.update(metrics.loss);
    if (metrics.lr !== undefined) this.lr = metrics.lr;
    if (this.enabled && !this.finished) this.draw(n >= this.total);
  }

  tick(count = 1, metrics: ProgressMetrics = {}): void {
    this.update(this.n + count, metrics);
  }

  /** Writes log text above the bar (the bar is redrawn below it). */
  log(text: string, stream: TermStream = this.stream): void {
    this.terminal.write(stream, text.endsWith('\n') ? text : `${text}\n`);
  }

  /** Final redraw, leaving the bar on screen with a newline. Idempotent. */
  finish(): void {
    if (this.finished) return;
    if (this.enabled) {
      this.draw(true);
      this.terminal.releaseStatus();
    }
    this.finished = true;
  }

  /** Removes the bar from the screen without a final line (e.g. on error). */
  clear(): void {
    if (this.enabled && !this.finished) this.terminal.clearStatus();
    this.finished = true;
  }

  /** The bar's text (no escape codes) for a terminal `columns` wide. */
  render(columns = this.stream.columns ?? 80): string {
    const cols = Math.max(20, columns) - 1; // never touch the last column: some terminals wrap there
    const elapsed = (this.now() - this.startMs) / 1000;
    const spi = this.secPerIt.value;
    const remaining = Math.max(0, this.total - this.n);
    const eta = Number.isFinite(spi) ? formatDuration(remaining * spi) : '?';
    let rate = `?${this.unit}/s`;
    if (Number.isFinite(spi) && spi > 0) {
      rate = spi <= 1 ? `${(1 / spi).toFixed(2)}${this.unit}/s` : `${spi.toFixed(2)}s/${this.unit}`;
    }
    const parts = [`${this.n}/${this.total}`, `[${formatDuration(elapsed)}<${eta}, ${rate}]`];
    const loss = this.lossEma.value;
    if (Number.isFinite(loss)) parts.push(`loss ${loss.toPrecision(4)}`);
    if (this.lr !== undefined) parts.push(`lr ${this.lr.toExponential(2)}`);
    const right = parts.join(' ');
    const frac = this.total > 0 ? this.n / this.total : 1;
    const pct = `${String(Math.floor(frac * 100)).padStart(3)}%`;
    const left = this.label ? `${this.label} ${pct}` : pct;
    const barWidth = cols - left.length - right.length - 4; // " |" + "| "
    const line = barWidth >= 5 ? `${left} |${drawBar(frac, Math.min(barWidth, 60))}| ${right}` : `${left} ${right}`;
    return line.length > cols ? line.slice(0, cols) : line;
  }

  private draw(force: boolean): void {
    const t = this.now();
    if (!force && t - this.lastDrawMs < this.minIntervalMs) return;
    this.lastDrawMs = t;
    this.terminal.setStatus(this.stream, this.render());
  }
}
