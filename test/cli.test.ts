/** The command line as a user runs it (node dist/cli.js ...). */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { native } from '../src/native';
import { byName, relativeError } from '../src/tensors';
import { parseTrainFlags, rerunCommand } from '../src/cli';
import { configFromArgv } from '../src/commands/train-options';
import { ConfigError } from '../src/config';

const cli = path.resolve(__dirname, '..', 'dist', 'cli.js');
const fixtures = path.join(__dirname, 'fixtures');
const tiny = path.join(fixtures, 'models', 'tiny');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-cli-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function run(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 120000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('train-lora forward', () => {
  test('writes outputs equal to the diffusers/transformers goldens', async () => {
    const out = path.join(tmp, 'fwd.safetensors');
    const r = run('forward', '--model', tiny, '--inputs', path.join(fixtures, 'golden', 'tiny', 'inputs.safetensors'), '--output', out);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const got = byName((await native().safetensorsRead(out)).tensors);
    const ref = byName((await native().safetensorsRead(path.join(fixtures, 'golden', 'tiny', 'outputs.safetensors'))).tensors);
    for (const k of ['text_embeddings', 'noise_pred', 'vae_mean', 'vae_std', 'vae_decoded']) expect([k, relativeError(got.get(k)!, ref.get(k)!) < 1e-4]).toEqual([k, true]);
  });

  test('--prompt tokenizes with the folder tokenizer and writes input_ids and text_embeddings', async () => {
    const out = path.join(tmp, 'prompt.safetensors');
    const r = run('forward', '--model', tiny, '--prompt', 'a red circle', '--prompt', 'a blue square on a white background', '--output', out);
    expect(r.status).toBe(0);
    const got = byName((await native().safetensorsRead(out)).tensors);
    expect(got.get('input_ids')!.shape).toEqual([2, 77]);
    expect(got.get('text_embeddings')!.shape).toEqual([2, 77, 32]);
  });

  test('a missing model folder is a one-line error naming it, exit 1', () => {
    const r = run('forward', '--model', path.join(tmp, 'nope'), '--prompt', 'x', '--output', path.join(tmp, 'x.safetensors'));
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^train-lora: .*nope: model folder not found/);
  });
});

describe('training options', () => {
  test('--help lists the groups', () => {
    const r = run('--help');
    expect(r.status).toBe(0);
    for (const g of ['Model:', 'Data:', 'Training:', 'Precision & memory:', 'Checkpointing:', 'Validation:', 'Output & logging:']) expect(r.stdout).toContain(g);
    expect(r.stdout).toContain('--max-train-steps');
  });

  test('snake_case spellings are aliases; flags override --config; the file overrides defaults', () => {
    const cfgFile = path.join(tmp, 'training_config.json');
    fs.writeFileSync(cfgFile, JSON.stringify({ train_batch_size: 2, gradient_accumulation_steps: 8, max_train_steps: 3000, learning_rate: 1e-4, lr_scheduler: 'cosine', lr_warmup_steps: 500, lora_rank: 8, lora_alpha: 16, validation_steps: 500, checkpointing_steps: 500 }));
    // yargs maps aliases onto the kebab-case key; emulate its parsed output for the parts we own.
    const c = configFromArgv({ config: cfgFile, 'pretrained-model-name-or-path': tiny, 'train-data-dir': tmp, 'max-train-steps': 10 });
    expect(c.max_train_steps).toBe(10);
    expect(c.gradient_accumulation_steps).toBe(8);
    expect(c.rank).toBe(8);
    expect(c.lora_alpha).toBe(16);
    expect(c.checkpoints_total_limit).toBe(5);
  });

  test('every problem is reported at once, naming the flag', () => {
    let err: ConfigError | undefined;
    try {
      configFromArgv({ 'train-data-dir': tmp, 'learning-rate': -1, 'lr-scheduler': 'sawtooth', 'train-batch-size': 0 });
    } catch (e) {
      err = e as ConfigError;
    }
    expect(err?.problems).toEqual(
      expect.arrayContaining([
        expect.stringMatching(/--pretrained-model-name-or-path is required/),
        expect.stringMatching(/--learning-rate/),
        expect.stringMatching(/--lr-scheduler: "sawtooth" is not one of/),
        expect.stringMatching(/--train-batch-size/),
      ]),
    );
  });

  test('a flag given twice: the last one wins under any spelling; array options repeat; negative numbers are values', () => {
    const c = configFromArgv(
      parseTrainFlags([
        '--model', tiny, '--data', tmp,
        '--max-train-steps', '2', '--max-train-steps', '1',
        '--checkpointing-steps', '5', '--checkpointing_steps=3',
        '--output-dir', 'a', '--out', 'b',
        '--center-crop', '--no-center-crop',
        '--validation-prompt', 'a red circle', '--validation-prompt', 'a blue square', 'a green star',
        '--save-format', 'diffusers', '--save-format', 'kohya',
        '--lora-target-modules', 'to_k', 'to_q', '--lora-target-modules', 'to_v',
        '--noise-offset', '-0.5', '--noise-offset', '1e-2',
      ]),
    );
    expect([c.max_train_steps, c.checkpointing_steps, c.output_dir, c.center_crop, c.noise_offset]).toEqual([1, 3, 'b', false, 0.01]);
    expect(c.validation_prompt).toEqual(['a red circle', 'a blue square', 'a green star']);
    expect(c.save_format).toEqual(['diffusers', 'kohya']);
    expect(c.lora_target_modules).toEqual(['to_k', 'to_q', 'to_v']);
    // The resume command a run prints never repeats --overwrite-output-dir (a switch for starting over, not for continuing).
    expect(rerunCommand(['--model', 'm', '--overwrite-output-dir', '--rank', '4'], ['--resume-from-checkpoint', 'latest'])).toBe('npx train-lora --model m --rank 4 --resume-from-checkpoint latest');
    // A negative value reaches the configuration's validation, which names the flag.
    expect(() => configFromArgv(parseTrainFlags(['--model', tiny, '--data', tmp, '--learning-rate', '-1e-3']))).toThrow(/--learning-rate: Number must be greater than 0/);
  });

  test('the CLI: duplicated flags and a negative --learning-rate are parsed as values, then validated (exit 1)', () => {
    const r = run('--model', tiny, '--data', path.join(tmp, 'no-data'), '--output-dir', path.join(tmp, 'neg'), '--checkpointing-steps', '5', '--checkpointing-steps', '2', '--learning-rate', '-1e-3');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--learning-rate: Number must be greater than 0/);
    expect(r.stderr).not.toMatch(/Unknown arguments|Expected number, received array/);
  });

  test('--config log_level is the log level (a --log-level flag still wins)', () => {
    const cfgFile = path.join(tmp, 'quiet_config.json');
    fs.writeFileSync(cfgFile, JSON.stringify({ log_level: 'error' }));
    const args = ['--model', tiny, '--data', path.join(tmp, 'no-data'), '--device', 'cpu', '--output-dir', path.join(tmp, 'quiet')];
    const quiet = run(...args, '--config', cfgFile);
    expect(quiet.status).toBe(1);
    expect(quiet.stdout + quiet.stderr).not.toMatch(/device: cpu/);
    const loud = run(...args, '--config', cfgFile, '--log-level', 'info');
    expect(loud.stdout + loud.stderr).toMatch(/device: cpu/);
  });

  test('an --output-dir that is a file is a clear error naming it (exit 1)', () => {
    const file = path.join(tmp, 'not-a-folder');
    fs.writeFileSync(file, 'x');
    const r = run('--model', tiny, '--data', path.join(tmp, 'no-data'), '--output-dir', file);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^train-lora: --output-dir .*not-a-folder: .*not-a-folder is a file, not a folder\. Pass a folder for the run/);
    expect(r.stderr).not.toMatch(/ENOTDIR/);
  });

  test('the CLI accepts --max_train_steps (diffusers spelling) and reports config errors with exit 1', () => {
    const r = run('--pretrained_model_name_or_path', tiny, '--train-data-dir', path.join(tmp, 'no-data'), '--max_train_steps', '0', '--output-dir', path.join(tmp, 'o'));
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--max-train-steps: Number must be greater than 0/);
  });
});

describe('train-lora checkpoints', () => {
  test('list, verify (exit 0/1), keep and export', async () => {
    // A tiny real run to have checkpoints.
    const data = path.join(tmp, 'data');
    const { makeDemoData } = await import('../src/data/demo-data');
    await makeDemoData(data, { count: 4, size: 32, seed: 0 });
    const out = path.join(tmp, 'run');
    const t = run('--model', tiny, '--data', data, '--out', out, '--device', 'cpu', '--resolution', '32', '--max-train-steps', '3', '--checkpointing-steps', '1', '--gradient-accumulation-steps', '1', '--rank', '4');
    expect(t.status).toBe(0);
    const list = run('checkpoints', 'list', out);
    expect(list.stdout).toMatch(/checkpoint-3\s+3\s+.*latest.*ok/);
    const ck = path.join(out, 'checkpoints', 'checkpoint-3');
    expect(run('checkpoints', 'verify', ck).status).toBe(0);
    const exported = path.join(tmp, 'exported.safetensors');
    expect(run('checkpoints', 'export', ck, '--format', 'kohya', '--out', exported).status).toBe(0);
    // The exported kohya file gives the same UNet output as the final diffusers file.
    const inputs = (await native().safetensorsRead(path.join(fixtures, 'golden', 'tiny', 'inputs.safetensors'))).tensors.filter((x) =>
      ['latents', 'timesteps', 'encoder_hidden_states'].includes(x.name),
    );
    const p = await native().loadPipeline(tiny, { components: ['unet'] });
    const a = (await native().forward(p, inputs, { lora: exported }))[0];
    const b = (await native().forward(p, inputs, { lora: path.join(out, 'pytorch_lora_weights.safetensors') }))[0];
    expect(Buffer.from(a.data).equals(Buffer.from(b.data))).toBe(true);
    expect(run('checkpoints', 'keep', ck).status).toBe(0);
    expect(fs.existsSync(path.join(ck, 'KEEP'))).toBe(true);
    // Damage it: verify fails with exit 1 and says why.
    const f = path.join(ck, 'optimizer.safetensors');
    const bytes = fs.readFileSync(f);
    bytes[bytes.length - 1] ^= 1;
    fs.writeFileSync(f, bytes);
    const bad = run('checkpoints', 'verify', ck);
    expect(bad.status).toBe(1);
    expect(bad.stdout).toMatch(/INVALID — optimizer\.safetensors does not match its sha256/);
    expect(run('list-runs', tmp).stdout).toMatch(/run\s+tiny\s+3\/3\s+checkpoint-3/);
  });
});

describe('train-lora test-setup', () => {
  test('passes on a good configuration and fails (exit 1) on a broken image or a model folder without a VAE', async () => {
    const { makeDemoData } = await import('../src/data/demo-data');
    const good = path.join(tmp, 'setup-data');
    await makeDemoData(good, { count: 4, size: 32, seed: 0 });
    const common = ['--device', 'cpu', '--resolution', '32', '--rank', '4'];
    const ok = run('test-setup', '--model', tiny, '--data', good, ...common);
    expect(ok.stdout).toMatch(/\[OK\] {3}5 training steps: losses/);
    expect(ok.stdout).toMatch(/\[OK\] {3}checkpoint round trip/);
    expect(ok.status).toBe(0);

    const broken = path.join(tmp, 'setup-broken');
    fs.cpSync(good, broken, { recursive: true });
    const img = fs.readdirSync(path.join(broken, 'images'))[0];
    fs.writeFileSync(path.join(broken, 'images', img), 'not an image');
    const r1 = run('test-setup', '--model', tiny, '--data', broken, ...common);
    expect(r1.status).toBe(1);
    expect(r1.stdout).toMatch(new RegExp(`\\[FAIL\\] dataset loads: .*${img.replace('.', '\\.')}`, 's'));
    expect(r1.stdout).toMatch(/fix: /);

    const noVae = path.join(tmp, 'setup-novae');
    fs.cpSync(tiny, noVae, { recursive: true });
    fs.rmSync(path.join(noVae, 'vae'), { recursive: true });
    const r2 = run('test-setup', '--model', noVae, '--data', good, ...common);
    expect(r2.status).toBe(1);
    expect(r2.stdout).toMatch(/\[FAIL\] models load: .*vae\/config\.json is missing/s);
    expect(r2.stdout).toMatch(/\[SKIP\] 5 training steps/);
  });
});
