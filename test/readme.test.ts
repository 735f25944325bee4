/** The README documents the product as it is: the flag reference is generated from the option table, the example config is valid. */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { flagTableMarkdown } from '../src/commands/train-options';
import { parseTrainConfig, readConfigFile } from '../src/config';

const root = path.join(__dirname, '..');
const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');

test('the flag reference in README.md is the one the CLI has (regenerate: npm run build:ts && node scripts/readme-flags.js)', () => {
  const m = /<!-- flags:start -->\n([\s\S]*?)\n<!-- flags:end -->/.exec(readme);
  expect(m).not.toBeNull();
  expect(m![1]).toBe(flagTableMarkdown());
});

test('the README names both quick-start commands', () => {
  expect(readme).toContain('npm install && npx train-lora --demo');
  expect(readme).toContain('npm install && npm test');
});

test('examples/training_config.json is a valid configuration', () => {
  const cfg = parseTrainConfig(readConfigFile(path.join(root, 'examples', 'training_config.json')));
  expect(cfg.rank).toBe(8);
  expect(cfg.lora_alpha).toBe(16);
  expect(cfg.validation_prompt.length).toBeGreaterThan(0);
});
