/** The embedded demo end to end as a user runs it (shortened with flags), and make-demo-data. */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { rerunCommand } from '../src/cli';
import { loadDataset } from '../src/data/dataset';

const cli = path.resolve(__dirname, '..', 'dist', 'cli.js');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-demo-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function run(args: string[], env: Record<string, string> = {}): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 540000, cwd: tmp, env: { ...process.env, ...env } });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('make-demo-data writes a loadable captioned dataset in the chosen layout', async () => {
  for (const layout of ['captions.json', 'metadata.jsonl', 'txt'] as const) {
    const out = path.join(tmp, `shapes-${layout}`);
    const r = run(['make-demo-data', out, '--count', '6', '--size', '16', '--layout', layout]);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain(`wrote 6 images (16x16, ${layout})`);
    const ds = await loadDataset(out);
    expect(ds.layout).toBe(layout);
    expect(ds.items).toHaveLength(6);
  }
}, 120000);

test('npx train-lora --demo: model + data in the cache, training with checkpoints, validation images, LoRA, and the resume command', () => {
  const cache = path.join(tmp, 'cache');
  const out = path.join(tmp, 'demo-run');
  const r = run(['--demo', '--max-train-steps', '12', '--checkpointing-steps', '6', '--validation-steps', '6', '--validation-num-inference-steps', '3', '--output-dir', out], { TRAIN_LORA_CACHE: cache });
  const all = r.stdout + r.stderr;
  expect({ status: r.status, tail: all.slice(-2000) }).toMatchObject({ status: 0 });
  expect(fs.existsSync(path.join(cache, 'demo', 'demo-model', 'unet', 'diffusion_pytorch_model.safetensors'))).toBe(true);
  expect(fs.existsSync(path.join(cache, 'demo', 'shapes', 'captions.json'))).toBe(true);
  expect(fs.existsSync(path.join(out, 'pytorch_lora_weights.safetensors'))).toBe(true);
  expect(fs.readdirSync(path.join(out, 'checkpoints')).filter((n) => n.startsWith('checkpoint-')).sort()).toEqual(['checkpoint-12', 'checkpoint-6']);
  const images = fs.readdirSync(path.join(out, 'validation'));
  expect(images).toEqual(expect.arrayContaining(['step000006_grid.png', 'step000012_grid.png', 'step000012_prompt1_img1.png']));
  // Piped output is JSON lines; the closing lines say where things are and how to continue.
  expect(all).toMatch(/LoRA: .*pytorch_lora_weights\.safetensors/);
  // The user's own flags are repeated; output folder, resume and steps are replaced.
  expect(all).toMatch(/continue training with: npx train-lora --demo --checkpointing-steps 6 --validation-steps 6 --validation-num-inference-steps 3 --output-dir \S+ --resume-from-checkpoint latest --max-train-steps 24/);
  expect(all).toMatch(/val_loss/);
}, 600000);

test('a hub id instead of a folder explains that models are downloaded first, and how', () => {
  const data = path.join(tmp, 'shapes-txt');
  const r = run(['--pretrained-model-name-or-path', 'runwayml/stable-diffusion-v1-5', '--train-data-dir', data, '--device', 'cpu', '--output-dir', path.join(tmp, 'hub')]);
  expect(r.status).toBe(1);
  expect(r.stderr).toMatch(/runwayml\/stable-diffusion-v1-5: not a local folder\. train-lora does not download models/);
  expect(r.stderr).toMatch(/huggingface-cli download runwayml\/stable-diffusion-v1-5 --local-dir \.\/models\/stable-diffusion-v1-5/);
});

test('--help lists the option groups in order', () => {
  const r = run(['--help']);
  expect(r.status).toBe(0);
  const groups = ['Model:', 'Data:', 'Training:', 'Precision & memory:', 'Checkpointing:', 'Validation:', 'Distributed:', 'Output & logging:'];
  const at = groups.map((g) => r.stdout.indexOf(`\n${g}\n`));
  expect(at.every((i) => i > 0)).toBe(true);
  expect([...at].sort((a, b) => a - b)).toEqual(at);
  expect(r.stdout).toContain('--max-train-steps, --max_train_steps');
});

test('rerunCommand repeats the user\'s flags, replaces output/resume/steps, and quotes for a shell', () => {
  expect(rerunCommand(['--model', './m', '--data', 'my photos', '--max-train-steps=300', '--num-processes', '2', '--resume-from-checkpoint', 'x'], ['--output-dir', 'outputs/run-001', '--resume-from-checkpoint', 'latest'])).toBe(
    "npx train-lora --model ./m --data 'my photos' --num-processes 2 --output-dir outputs/run-001 --resume-from-checkpoint latest",
  );
  expect(rerunCommand(['--validation-prompt', "a cat's hat"], [])).toBe("npx train-lora --validation-prompt 'a cat'\\''s hat'");
});
