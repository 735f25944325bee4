#!/usr/bin/env node
// Rewrites the flag reference in README.md (between the flags:start / flags:end markers) from the option table in
// src/commands/train-options.ts. Run after `npm run build:ts`; test/readme.test.ts fails when the README is stale.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { flagTableMarkdown } = require('../dist/commands/train-options');

const file = path.join(__dirname, '..', 'README.md');
const text = fs.readFileSync(file, 'utf8');
const start = '<!-- flags:start -->';
const end = '<!-- flags:end -->';
const a = text.indexOf(start);
const b = text.indexOf(end);
if (a < 0 || b < a) throw new Error(`README.md has no ${start} ... ${end} block`);
fs.writeFileSync(file, `${text.slice(0, a + start.length)}\n${flagTableMarkdown()}\n${text.slice(b)}`);
console.log('README.md flag reference updated');
