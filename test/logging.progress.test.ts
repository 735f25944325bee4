import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { createLogger } from '../src/logging/logger';
import { formatDuration, ProgressBar, Terminal, TermStream } from '../src/logging/progress';

const CLEAR = '\r\x1b[2K';

/** A fake terminal stream; `screen` is shared so the order across stdout/stderr is visible. */
class FakeTty implements TermStream {
  readonly isTTY: boolean;
  constructor(
    readonly name: string,
    readonly screen: string[],
    public columns = 100,
    tty = true,
  ) {
    this.isTTY = tty;
  }
  write(chunk: string): boolean {
    this.screen.push(`${this.name}:${chunk}`);
    return true;
  }
  get writes(): string[] {
    return this.screen.filter((s) => s.startsWith(`${this.name}:`)).map((s) => s.slice(this.name.length + 1));
  }
}

function setup(columns = 100, tty = true) {
  const screen: string[] = [];
  const err = new FakeTty('err', screen, columns, tty);
  const out = new FakeTty('out', screen, columns, tty);
  const clock = { t: 0 };
  const terminal = new Terminal();
  return { screen, err, out, clock, terminal, now: () => clock.t };
}

describe('ProgressBar rendering', () => {
  test('shows step/total, percentage, bar, smoothed loss, lr, it/s, elapsed and ETA', () => {
    const { err, clock, terminal, now } = setup(120);
    const bar = new ProgressBar({ total: 100, label: 'Steps', stream: err, terminal, now });
    for (let s = 1; s <= 10; s++) {
      clock.t += 500; // 2 steps per second
      bar.update(s, { loss: 0.2, lr: 1e-4 });
    }
    const line = bar.render();
    expect(line).toContain('Steps  10%');
    expect(line).toContain('10/100');
    expect(line).toContain('loss 0.2000');
    expect(line).toContain('lr 1.00e-4');
    expect(line).toContain('2.00it/s');
    expect(line).toContain('[00:05<00:45,'); // elapsed 5 s, 90 steps at 2/s
    expect(line).toMatch(/\|█+[▏▎▍▌▋▊▉]? +\|/);
    expect(line.length).toBeLessThan(120);
    expect(bar.rate).toBeCloseTo(2, 10);
  });

  test('loss is an EMA and rate is smoothed; slow runs show s/it', () => {
    const { err, clock, terminal, now } = setup();
    const bar = new ProgressBar({ total: 10, stream: err, terminal, now, lossSmoothing: 0.5, rateSmoothing: 0.5 });
    clock.t += 4000;
    bar.update(1, { loss: 1 });
    clock.t += 2000;
    bar.update(2, { loss: 3 });
    // bias-corrected EMA with alpha 0.5: (0.5*3 + 0.25*1) / 0.75
    expect(bar.smoothedLoss).toBeCloseTo((0.5 * 3 + 0.25 * 1) / 0.75, 12);
    expect(1 / bar.rate).toBeCloseTo((0.5 * 2 + 0.25 * 4) / 0.75, 12);
    expect(bar.render()).toContain('2.67s/it');
    bar.update(3, { loss: NaN }); // a NaN loss is not averaged in
    expect(Number.isFinite(bar.smoothedLoss)).toBe(true);
  });

  test('before the first step the rate and ETA are unknown', () => {
    const { err, terminal, now } = setup();
    const line = new ProgressBar({ total: 50, stream: err, terminal, now, unit: 'step' }).render();
    expect(line).toContain('0/50');
    expect(line).toContain('<?, ?step/s]');
  });

  test('width-aware: never longer than the terminal; the bar goes first when narrow', () => {
    const { err, clock, terminal, now } = setup();
    const bar = new ProgressBar({ total: 1000, label: 'Steps', stream: err, terminal, now });
    clock.t += 1000;
    bar.update(500, { loss: 0.123456, lr: 3e-4 });
    for (const cols of [20, 40, 60, 80, 100, 200]) {
      const line = bar.render(cols);
      expect(line.length).toBeLessThanOrEqual(cols - 1);
    }
    expect(bar.render(200)).toContain('█');
    expect(bar.render(60)).not.toContain('|');
    expect(bar.render(60)).toContain('500/1000');
    err.columns = 50; // the stream's width is read at every render (terminal resize)
    expect(bar.render().length).toBeLessThanOrEqual(49);
  });

  test('formatDuration', () => {
    expect(formatDuration(0)).toBe('00:00');
    expect(formatDuration(61.4)).toBe('01:01');
    expect(formatDuration(3723)).toBe('1:02:03');
    expect(formatDuration(Infinity)).toBe('?');
  });
});

describe('ProgressBar drawing', () => {
  test('redraws at most every minIntervalMs, but always on the last step', () => {
    const { err, clock, terminal, now } = setup();
    const bar = new ProgressBar({ total: 100, stream: err, terminal, now, minIntervalMs: 100 });
    const draws = (): number => err.writes.filter((w) => w.startsWith(CLEAR)).length;
    expect(draws()).toBe(1); // initial draw
    for (let s = 1; s <= 99; s++) {
      clock.t += 10;
      bar.update(s);
    }
    // 990 ms of updates every 10 ms -> about 10 redraws, not 99
    expect(draws()).toBeGreaterThanOrEqual(9);
    expect(draws()).toBeLessThanOrEqual(11);
    const before = draws();
    clock.t += 1;
    bar.update(100);
    expect(draws()).toBe(before + 1);
    bar.finish();
    expect(err.writes[err.writes.length - 1]).toBe('\n');
    const n = err.writes.length;
    bar.update(100);
    bar.finish();
    expect(err.writes.length).toBe(n); // nothing after finish
  });

  test('prints nothing when the stream is not a TTY, but still tracks the rate', () => {
    const { err, clock, terminal, now } = setup(100, false);
    const bar = new ProgressBar({ total: 10, stream: err, terminal, now });
    clock.t += 1000;
    bar.update(5, { loss: 1, lr: 1e-3 });
    bar.log('hello');
    bar.finish();
    expect(bar.enabled).toBe(false);
    expect(err.writes.filter((w) => w !== 'hello\n')).toEqual([]);
    expect(bar.rate).toBeCloseTo(5, 10);
  });

  test('log lines clear the bar, print, and redraw it below', () => {
    const { screen, err, out, clock, terminal, now } = setup();
    const bar = new ProgressBar({ total: 10, stream: err, terminal, now });
    clock.t += 1000;
    bar.update(3, { loss: 0.5 });
    const barText = bar.render();
    screen.length = 0;
    terminal.write(out, 'a log line\n');
    expect(screen).toEqual(['err:' + CLEAR, 'out:a log line\n', 'err:' + barText]);
    bar.clear();
    expect(screen[screen.length - 1]).toBe('err:' + CLEAR);
    screen.length = 0;
    terminal.write(out, 'after\n');
    expect(screen).toEqual(['out:after\n']); // no bar any more
  });

  test('a pretty logger on the same terminal writes between clear and redraw', () => {
    const { screen, err, out, clock, terminal, now } = setup();
    const { logger, close } = createLogger({ console: 'pretty', stdout: out, terminal, colorize: false });
    const bar = new ProgressBar({ total: 10, label: 'Steps', stream: err, terminal, now });
    clock.t += 1000;
    bar.update(2, { loss: 0.25, lr: 2e-4 });
    screen.length = 0;
    logger.info({ step: 2 }, 'checkpoint saved');
    expect(screen).toHaveLength(3);
    expect(screen[0]).toBe('err:' + CLEAR);
    // Structured fields stay out of the terminal (they are in the JSON log file).
    expect(screen[1]).toMatch(/^out:\[\d\d:\d\d:\d\d\] INFO: checkpoint saved\n$/);
    expect(screen[2]).toBe('err:' + bar.render());
    close();
  });

  test('denoising use: tick() with a unit', () => {
    const { err, clock, terminal, now } = setup();
    const bar = new ProgressBar({ total: 30, label: 'Denoising', unit: 'step', stream: err, terminal, now });
    for (let i = 0; i < 30; i++) {
      clock.t += 50;
      bar.tick();
    }
    bar.finish();
    const last = err.writes.filter((w) => w.startsWith(CLEAR)).pop() as string;
    expect(last).toContain('Denoising 100%');
    expect(last).toContain('30/30');
    expect(last).toContain('20.00step/s');
  });

  test('rejects a bad total', () => {
    expect(() => new ProgressBar({ total: -1 })).toThrow(RangeError);
  });
});

describe('createLogger', () => {
  const tmp = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'log-'));

  test('JSON lines when stdout is not a TTY, plus a debug-level JSON file written synchronously', () => {
    const { out } = setup(100, false);
    const file = path.join(tmp(), 'logs', 'train.log');
    const { logger, close, file: f } = createLogger({ stdout: out, file });
    expect(f).toBe(file);
    logger.info({ step: 1, loss: 0.5 }, 'step done');
    logger.debug('details');
    // no flush, no close: the line is already in the file
    const lines = fs.readFileSync(file, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatchObject({ level: 30, msg: 'step done', step: 1, loss: 0.5 });
    expect(typeof lines[0].time).toBe('string');
    expect(lines[1]).toMatchObject({ level: 20, msg: 'details' });
    const stdoutLines = out.writes.join('').trim().split('\n').map((l) => JSON.parse(l));
    expect(stdoutLines).toHaveLength(1); // console level is info
    expect(stdoutLines[0].msg).toBe('step done');
    close();
    close();
  });

  test('auto mode picks pretty on a TTY; level and fileLevel are honoured', () => {
    const { out, terminal } = setup(100, true);
    const file = path.join(tmp(), 'train.log');
    const { logger, close } = createLogger({ stdout: out, terminal, file, level: 'warn', fileLevel: 'info', colorize: false });
    logger.info('only in the file');
    logger.warn('everywhere');
    logger.debug('nowhere');
    expect(out.writes).toHaveLength(1);
    expect(out.writes[0]).toMatch(/WARN: everywhere\n$/);
    const msgs = fs.readFileSync(file, 'utf8').trim().split('\n').map((l) => JSON.parse(l).msg);
    expect(msgs).toEqual(['only in the file', 'everywhere']);
    close();
  });

  test('silent console still logs to the file', () => {
    const { out } = setup();
    const file = path.join(tmp(), 'train.log');
    const { logger, close } = createLogger({ stdout: out, console: 'silent', file });
    logger.info('x');
    expect(out.writes).toEqual([]);
    expect(fs.readFileSync(file, 'utf8')).toContain('"msg":"x"');
    close();
  });
});
