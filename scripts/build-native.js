#!/usr/bin/env node
// Finds libtorch and builds the native addon with cmake-js.
//
// libtorch is looked up in this order, and the choice is printed (the logic is in scripts/libtorch.js):
//   1. the LIBTORCH environment variable: a libtorch folder (include/, lib/), a `torch` package folder, or the
//      site-packages (or pip --target) folder above one;
//   2. the `torch` package of python3 (or $PYTHON), found with importlib.util.find_spec (torch is not imported);
//   3. `pip install --target .torch torch` into this project's git-ignored .torch/ folder;
//   4. otherwise: stop and say what to do.
// Debian's libtorch-dev is never used (1.13 has no scaled_dot_product_attention).
//
// Before compiling, it checks CMake, the C++ compiler and the libtorch (version, SDPA headers, CPU, C++ ABI) and
// says what is wrong in words; after compiling, it loads the addon once so that a build that cannot load (missing
// CUDA libraries, ABI mismatch) fails here with an explanation instead of at the first `train-lora` run.
//
// Usage: node scripts/build-native.js [--force] [--print-libtorch] [--out DIR]
//   --out DIR         build folder (default: build/); the addon is DIR/Release/train_lora.node, which
//                     src/native.ts loads from build/ or from the file named by TRAIN_LORA_ADDON
//   --print-libtorch  only find libtorch and print what was found (JSON)
//   --force           accepted for compatibility: cmake-js always rebuilds what changed
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');
const lt = require('./libtorch');

const root = path.resolve(__dirname, '..');
const args = process.argv.slice(2);
const log = (msg) => console.log(`[train-lora] ${msg}`);
const platform = process.platform;

function option(name) {
  const i = args.indexOf(name);
  if (i < 0) return undefined;
  if (i + 1 >= args.length) throw new Error(`${name} needs a value`);
  return args[i + 1];
}

function python() {
  return process.env.PYTHON || 'python3';
}

/** stdout of `cmd args`, or null when it cannot run or fails. */
function output(cmd, cmdArgs) {
  const r = spawnSync(cmd, cmdArgs, { encoding: 'utf8' });
  return r.status === 0 ? r.stdout : null;
}

/** The folder of python's torch package, without importing torch (importing a CUDA build takes seconds). */
function torchFromPython() {
  const code =
    'import importlib.util,sys\n' +
    's=importlib.util.find_spec("torch")\n' +
    'print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else "")';
  const out = output(python(), ['-c', code]);
  return out && out.trim() ? out.trim() : null;
}

function pipInstallLocal() {
  const target = path.join(root, '.torch');
  const dir = path.join(target, 'torch');
  if (!lt.torchDirProblem(dir, platform)) return dir;
  const base = ['-m', 'pip', 'install', '--disable-pip-version-check', '--no-deps', '--target', target, 'torch'];
  log(`installing torch with pip into ${target} (a one-time step, ~200 MB for the CPU build)`);
  // A local wheelhouse (pip's find-links) answers at once; only then ask the configured indexes.
  let r = spawnSync(python(), [...base.slice(0, 3), '--no-index', ...base.slice(3)], { stdio: 'inherit' });
  if (r.status !== 0) {
    log("no local torch wheel; asking pip's configured index (this downloads torch)");
    r = spawnSync(python(), base, { stdio: 'inherit' });
  }
  return r.status === 0 ? target : null;
}

/** Stops with a clear message when CMake or the C++ compiler cannot build the addon. */
function checkTools() {
  const cmakeProblem = lt.cmakeProblem(output('cmake', ['--version']));
  if (cmakeProblem) throw new Error(cmakeProblem);
  // The compiler CMake will pick: $CXX, else the first of these on PATH (CMake's own order).
  const tried = process.env.CXX ? [process.env.CXX] : platform === 'darwin' ? ['c++', 'clang++', 'g++'] : ['c++', 'g++', 'clang++'];
  for (const cxx of tried) {
    const out = output(cxx, ['--version']);
    if (out === null) continue;
    const c = lt.compilerCheck(out, platform);
    if (c.problem) throw new Error(c.problem);
    if (c.warning) log(`warning: ${c.warning}`);
    return;
  }
  throw new Error(lt.noCompilerMessage(tried, platform));
}

/** Loads the built addon in a fresh node; throws an Error that explains why it cannot load. */
function loadCheck(addon) {
  const r = spawnSync(process.execPath, ['-e', 'require(process.argv[1]).version()', addon], { encoding: 'utf8' });
  if (r.status === 0) return;
  const msg = (r.stderr || r.stdout || `exit status ${r.status}`).trim();
  const firstError = msg.split('\n').find((l) => /Error|error:/.test(l)) ?? msg.split('\n')[0];
  throw new Error(`the addon was built but does not load: ${firstError}\n${lt.explainLoadFailure(msg) ?? 'See the error above; rebuild with `npm run build:native`.'}`);
}

function main() {
  const out = path.resolve(option('--out') ?? path.join(root, 'build'));
  const printOnly = args.includes('--print-libtorch');
  if (!printOnly) checkTools();
  const { dir, source, skipped } = lt.findLibtorch({
    env: process.env,
    platform,
    pythonName: python(),
    pythonTorch: torchFromPython,
    installLocal: pipInstallLocal,
  });
  for (const s of skipped) log(`skipped ${s}`);
  const binaryProblem = lt.binaryProblem(dir, platform, process.arch);
  if (binaryProblem) throw new Error(binaryProblem);
  const version = lt.torchVersion(dir);
  const abi = lt.cxxAbi(dir, platform);
  const layout = lt.cudaLayout(dir, { platform, env: process.env });
  const ver = `${version.major}.${version.minor}.${version.patch}`;
  log(`libtorch ${ver}: ${dir} (from ${source})`);
  log(lt.ncclSummary(layout, dir));
  const info = { dir, source, version: ver, cuda: layout.cuda, wheels: layout.wheels, nccl: layout.nccl, cxxAbi: abi };
  if (printOnly) {
    console.log(JSON.stringify(info, null, 2));
    return;
  }

  log(`building the native addon into ${out} (${layout.cuda ? `CPU + CUDA${layout.wheels ? `, ${layout.wheels} wheels` : ''}` : 'CPU'}` +
    `${abi ? `, C++ ABI ${abi}` : ''}); a clean build takes a few minutes`);
  const defs = Object.entries(lt.cmakeVariables({ dir, abi, layout })).map(([k, v]) => `--CD${k}=${v}`);
  const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
  const jobs = String(Math.max(1, Math.min(os.availableParallelism?.() ?? 2, 8)));
  const t0 = Date.now();
  const r = spawnSync(process.execPath, [cmakeJs, 'build', '-d', root, '-O', out, '-p', jobs, '-m', ...defs, '-l', 'warn'], {
    stdio: 'inherit',
    cwd: root,
  });
  if (r.status !== 0) {
    console.error(
      `[train-lora] the native build failed; see the compiler output above. It used libtorch ${ver} at ${dir}; ` +
        'requirements: CMake >= 3.18 and a C++20 compiler (g++ 11+ or clang 14+).',
    );
    process.exit(r.status ?? 1);
  }
  const addon = path.join(out, 'Release', 'train_lora.node');
  loadCheck(addon);
  fs.writeFileSync(path.join(out, 'libtorch.json'), JSON.stringify({ ...info, builtAt: new Date().toISOString() }, null, 2) + '\n');
  const shown = path.relative(process.cwd(), addon);
  log(`native addon built in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${shown.startsWith('..') ? addon : shown}`);
}

try {
  main();
} catch (e) {
  console.error(`[train-lora] ${e.message}`);
  process.exit(1);
}
