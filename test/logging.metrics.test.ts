import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { logPaths } from '../src/logging';
import { MetricsWriter, readMetrics } from '../src/logging/metrics';

const tmpFile = (): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'metrics-')), 'logs', 'metrics.jsonl');

describe('metrics.jsonl', () => {
  test('one JSON object per append, on disk before append returns', () => {
    const file = tmpFile();
    const w = new MetricsWriter(file, { now: () => 1_700_000_000_500 });
    w.append({ step: 1, epoch: 0, loss: 0.5, lr: 1e-4, grad_norm: 0.9, it_per_sec: 1.5 });
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    expect(lines).toHaveLength(2);
    expect(lines[1]).toBe('');
    expect(JSON.parse(lines[0])).toEqual({ step: 1, epoch: 0, loss: 0.5, lr: 1e-4, grad_norm: 0.9, it_per_sec: 1.5, time: 1_700_000_000.5 });
    w.append({ step: 2, epoch: 0, loss: 0.4, lr: 2e-4, time: 5, extra_metric: 3 });
    expect(JSON.parse(fs.readFileSync(file, 'utf8').split('\n')[1])).toEqual({ step: 2, epoch: 0, loss: 0.4, lr: 2e-4, time: 5, extra_metric: 3 });
    w.close();
    w.close();
    expect(() => w.append({ step: 3, epoch: 0, loss: 0, lr: 0 })).toThrow(/closed/);
  });

  test('non-finite numbers survive as strings and read back as numbers', () => {
    const file = tmpFile();
    const w = new MetricsWriter(file);
    w.append({ step: 1, epoch: 0, loss: NaN, lr: 1e-4, grad_norm: Infinity, it_per_sec: -Infinity });
    w.close();
    expect(fs.readFileSync(file, 'utf8')).toContain('"loss":"NaN","lr":0.0001,"grad_norm":"Infinity","it_per_sec":"-Infinity"');
    const [m] = readMetrics(file);
    expect(m.loss).toBeNaN();
    expect(m.grad_norm).toBe(Infinity);
    expect(m.it_per_sec).toBe(-Infinity);
  });

  test('appends across runs; a torn last line is fenced off and skipped; the later record of a step wins', () => {
    const file = tmpFile();
    const a = new MetricsWriter(file);
    a.append({ step: 1, epoch: 0, loss: 1, lr: 1 });
    a.append({ step: 2, epoch: 0, loss: 2, lr: 1 });
    a.close();
    fs.appendFileSync(file, '{"step":3,"epoch":0,"lo'); // crash mid-write
    const b = new MetricsWriter(file); // resumed from the step-1 checkpoint
    b.append({ step: 2, epoch: 0, loss: 2.5, lr: 1 });
    b.append({ step: 3, epoch: 0, loss: 3, lr: 1 });
    b.close();
    const raw = fs.readFileSync(file, 'utf8').split('\n');
    expect(raw[2]).toBe('{"step":3,"epoch":0,"lo');
    expect(JSON.parse(raw[3]).loss).toBe(2.5);
    expect(readMetrics(file).map((m) => [m.step, m.loss])).toEqual([
      [1, 1],
      [2, 2.5],
      [3, 3],
    ]);
  });

  test('rejects a non-integer step', () => {
    const w = new MetricsWriter(tmpFile());
    expect(() => w.append({ step: 1.5, epoch: 0, loss: 0, lr: 0 })).toThrow(/integer/);
    w.close();
  });

  test('log paths under OUT/logs', () => {
    expect(logPaths('/out')).toEqual({
      dir: path.join('/out', 'logs'),
      logFile: path.join('/out', 'logs', 'train.log'),
      metrics: path.join('/out', 'logs', 'metrics.jsonl'),
      tensorboard: path.join('/out', 'logs', 'text2image-fine-tune'),
    });
  });
});
