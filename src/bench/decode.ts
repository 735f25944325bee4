/**
 * Decode throughput of the image pipeline: one image at a time vs the prefetching BatchLoader
 * (sharp's libuv concurrency) vs a worker_threads pool.
 *
 *   npm run bench -- --decode [--count 64] [--width 768] [--height 512] [--resolution 512] [--threads 2] [--passes 3]
 *
 * Writes `count` synthetic photo-like JPEGs to a temp folder, then reports for each strategy the
 * best wall-clock images/s over the passes and the CPU time per image summed over all threads
 * (robust on a shared machine; for the loader it includes work on batches prefetched past the
 * last one consumed). Nothing here is used by training; it is a measuring stick.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

import sharp from 'sharp';

import { loadDataset } from '../data/dataset';
import { type ImageTransformOptions, processImage } from '../data/images';
import { BatchLoader } from '../data/loader';
import { Prng, derive } from '../data/prng';

interface BenchArgs {
  count: number;
  width: number;
  height: number;
  resolution: number;
  threads: number;
  passes: number;
}

function parseArgs(argv: readonly string[]): BenchArgs {
  const out: BenchArgs = { count: 64, width: 768, height: 512, resolution: 512, threads: 2, passes: 3 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '') as keyof BenchArgs;
    if (!(key in out)) throw new Error(`unknown option ${argv[i]}`);
    out[key] = Number(argv[i + 1]);
  }
  return out;
}

/** Smooth colour fields plus noise: compresses and decodes like a photo, unlike flat colours. */
async function writeImages(dir: string, a: BenchArgs): Promise<string[]> {
  fs.mkdirSync(path.join(dir, 'images'), { recursive: true });
  const rng = Prng.fromSeed(7);
  const files: string[] = [];
  const captions: Record<string, string> = {};
  for (let i = 0; i < a.count; i++) {
    const px = new Uint8Array(a.width * a.height * 3);
    const f = [rng.nextFloat() * 0.05 + 0.01, rng.nextFloat() * 0.05 + 0.01, rng.nextFloat() * 6];
    for (let y = 0; y < a.height; y++) {
      for (let x = 0; x < a.width; x++) {
        const o = (y * a.width + x) * 3;
        for (let c = 0; c < 3; c++) {
          const v = 128 + 70 * Math.sin(x * f[0] + c + f[2]) * Math.cos(y * f[1] - c) + (rng.nextU32() & 31) - 16;
          px[o + c] = v < 0 ? 0 : v > 255 ? 255 : v;
        }
      }
    }
    const name = `img_${String(i).padStart(3, '0')}.jpg`;
    await sharp(Buffer.from(px.buffer), { raw: { width: a.width, height: a.height, channels: 3 } })
      .jpeg({ quality: 90 })
      .toFile(path.join(dir, 'images', name));
    files.push(path.join(dir, 'images', name));
    captions[name] = `image ${i}`;
  }
  fs.writeFileSync(path.join(dir, 'captions.json'), JSON.stringify(captions));
  return files;
}

interface Measure {
  /** Images per wall-clock second (best pass). */
  perSecond: number;
  /** CPU milliseconds per image over all threads of this process (median pass). */
  cpuMs: number;
}

/** Best wall-clock throughput of `passes` runs, and the CPU time per image (all threads). */
async function measure(passes: number, n: number, fn: () => Promise<(() => Promise<void>) | void>): Promise<Measure> {
  let best = Infinity;
  const cpu: number[] = [];
  for (let p = 0; p < passes; p++) {
    const c0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    const cleanup = await fn();
    best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
    const c = process.cpuUsage(c0);
    cpu.push((c.user + c.system) / 1000 / n);
    // Outside the timing: e.g. a loader's close(), which waits for batches prefetched past the end.
    if (cleanup) await cleanup();
  }
  cpu.sort((a, b) => a - b);
  return { perSecond: n / best, cpuMs: cpu[Math.floor(cpu.length / 2)] };
}

interface WorkerJob {
  file: string;
  index: number;
}

/** A minimal worker pool: each worker runs processImage one job at a time and returns the floats. */
async function runWorkers(files: readonly string[], opts: ImageTransformOptions, threads: number): Promise<void> {
  const workers = Array.from({ length: threads }, () => new Worker(__filename, { workerData: opts }));
  let next = 0;
  await Promise.all(
    workers.map(
      (w) =>
        new Promise<void>((resolve, reject) => {
          const feed = (): void => {
            if (next >= files.length) {
              resolve();
              return;
            }
            const job: WorkerJob = { file: files[next], index: next };
            next += 1;
            w.postMessage(job);
          };
          w.on('message', feed);
          w.on('error', reject);
          feed();
        }),
    ),
  );
  await Promise.all(workers.map((w) => w.terminate()));
}

function workerMain(): void {
  const opts = workerData as ImageTransformOptions;
  parentPort?.on('message', (job: WorkerJob) => {
    processImage(job.file, opts, derive(1, job.index)).then(
      (r) => parentPort?.postMessage(r.pixels, [r.pixels.buffer as ArrayBuffer]),
      (err: unknown) => {
        throw err;
      },
    );
  });
}

export async function decodeMain(argv: readonly string[]): Promise<void> {
  const a = parseArgs(argv);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'train-lora-bench-'));
  try {
    const files = await writeImages(dir, a);
    const opts: ImageTransformOptions = { resolution: a.resolution, randomFlip: true };
    const ds = await loadDataset(dir);
    const cores = os.availableParallelism();
    const passes = a.passes;
    console.log(`${a.count} JPEGs ${a.width}x${a.height} -> ${a.resolution}, ${cores} cores, UV_THREADPOOL_SIZE=${process.env.UV_THREADPOOL_SIZE ?? '4 (default)'}`);
    const report = (name: string, m: Measure): void =>
      console.log(`${name.padEnd(44)} ${m.perSecond.toFixed(1).padStart(7)} images/s  ${m.cpuMs.toFixed(1).padStart(6)} CPU ms/image`);

    report('single-threaded (one image at a time)', await measure(passes, files.length, async () => {
      for (let i = 0; i < files.length; i++) await processImage(files[i], opts, derive(1, i));
    }));
    for (const concurrency of [1, 2, 4, 8]) {
      report(`BatchLoader, batch 8, concurrency ${concurrency}`, await measure(passes, files.length, async () => {
        const loader = new BatchLoader(ds, { ...opts, batchSize: 8, seed: 1, concurrency, prefetchBatches: 2 });
        for (let b = 0; b < files.length / 8; b++) await loader.next();
        return () => loader.close();
      }));
    }
    report(`worker_threads pool, ${a.threads} workers`, await measure(passes, files.length, () => runWorkers(files, opts, a.threads)));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (!isMainThread) {
  workerMain();
} else if (require.main === module) {
  decodeMain(process.argv.slice(2)).catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}
