/**
 * --cuda-graphs (native/train/cuda_graph.h) where there is no GPU: the trainer says why graphs are not used and trains
 * eagerly, bit-identically to a trainer without the option; the training loop logs the reason. The graph path itself
 * has NOT run on a GPU yet (no device here): only this fallback is tested; the CUDA build compiles it.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { makeDemoData } from '../src/data/demo-data';
import { native, type HostTensor, type TrainBatch } from '../src/native';
import { fromFloat32, fromInt64 } from '../src/tensors';
import { train } from '../src/train/train';
import { NoiseSchedule } from '../src/schedules/noise';
import { Quiet } from './helpers/quiet-reporter';
import { TINY_MODEL, tinyRunConfig } from './helpers/tiny-run';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-cudagraphs-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Seeded inputs: pixels in [-1, 1] and token ids. */
function batch(i: number): TrainBatch {
  let s = 12345 + i;
  const rnd = (): number => ((s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  return {
    pixelValues: fromFloat32('pixel_values', [2, 3, 32, 32], Float32Array.from({ length: 2 * 3 * 32 * 32 }, () => rnd() * 2 - 1)),
    inputIds: fromInt64('input_ids', [2, 77], Array.from({ length: 2 * 77 }, () => Math.floor(rnd() * 1000))),
  };
}

async function run(cudaGraphs: boolean): Promise<{ losses: number[]; weights: HostTensor[]; status: Awaited<ReturnType<ReturnType<typeof native>['trainerGraphStatus']>> }> {
  const noise = NoiseSchedule.fromFile(path.join(TINY_MODEL, 'scheduler', 'scheduler_config.json'));
  const pipe = await native().loadPipeline(TINY_MODEL, { device: 'cpu' });
  const { trainer } = await native().createTrainer(pipe, { rank: 4, alpha: 4, alphasCumprod: Array.from(noise.alphasCumprod), seed: 3, cudaGraphs });
  const losses: number[] = [];
  // Accumulation 2 over 4 steps: more micro-steps than the graphs' warm-up.
  for (let i = 0; i < 8; i++) {
    losses.push(await native().trainerMicroStep(trainer, batch(i), 2));
    if (i % 2 === 1) await native().trainerOptimizerStep(trainer, 1e-3);
  }
  const status = await native().trainerGraphStatus(trainer);
  const dir = path.join(tmp, `state-${cudaGraphs}`);
  fs.mkdirSync(dir, { recursive: true });
  await native().trainerSaveState(trainer, dir);
  const weights = (await native().safetensorsRead(path.join(dir, 'model.safetensors'))).tensors;
  native().dispose(trainer);
  native().dispose(pipe);
  return { losses, weights, status };
}

test('on the CPU, cudaGraphs trains eagerly, bit-identical to a trainer without it, and says why', async () => {
  const eager = await run(false);
  const graphs = await run(true);
  expect(eager.status).toMatchObject({ requested: false, active: false, graphs: 0, replays: 0 });
  expect(graphs.status.requested).toBe(true);
  expect(graphs.status.active).toBe(false);
  expect(graphs.status.replays).toBe(0);
  expect(graphs.status.reason).toMatch(native().version().cuda ? /device cpu: CUDA graphs exist only on CUDA devices/ : /no CUDA graphs/);
  expect(graphs.losses).toEqual(eager.losses);
  expect(graphs.weights.map((t) => t.name)).toEqual(eager.weights.map((t) => t.name));
  graphs.weights.forEach((t, i) => expect(Buffer.compare(Buffer.from(t.data), Buffer.from(eager.weights[i].data))).toBe(0));
});

test('train() with --cuda-graphs on the CPU logs why graphs are not used and trains', async () => {
  const data = path.join(tmp, 'data');
  await makeDemoData(data, { count: 4, size: 32, seed: 1 });
  const q = new Quiet();
  const r = await train(tinyRunConfig(path.join(tmp, 'out'), data, { max_train_steps: 2, checkpointing_steps: 2, cuda_graphs: true }), q, { installSignalHandlers: false });
  expect(r.globalStep).toBe(2);
  expect(q.messages.filter((m) => m.includes('--cuda-graphs'))).toEqual([expect.stringMatching(/^warn: --cuda-graphs: not used: .*training runs eagerly/)]);
});
