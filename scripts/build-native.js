#!/usr/bin/env node
// Finds libtorch and builds the native addon with cmake-js.
//
// libtorch is looked up in this order, and the choice is printed:
//   1. the LIBTORCH environment variable: a libtorch folder (include/, lib/) or a `torch` package folder;
//   2. the `torch` package of python3 (or $PYTHON), found with importlib.util.find_spec (torch is not imported);
//   3. `pip install --target .torch torch` into this project's git-ignored .torch/ folder;
//   4. otherwise: stop and say what to do.
// Debian's libtorch-dev is never used (1.13 has no scaled_dot_product_attention).
//
// Usage: node scripts/build-native.js [--force] [--print-libtorch]
'use strict';
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.resolve(__dirname, '..');
const args = process.argv.slice(2);
const log = (msg) => console.log(`[train-lora] ${msg}`);

function isTorchDir(dir) {
  return (
    !!dir &&
    fs.existsSync(path.join(dir, 'include', 'torch', 'csrc', 'api', 'include', 'torch', 'torch.h')) &&
    fs.existsSync(path.join(dir, 'lib', 'libtorch.so'))
  );
}

function python() {
  return process.env.PYTHON || 'python3';
}

function torchFromPython() {
  const code =
    'import importlib.util,sys\n' +
    's=importlib.util.find_spec("torch")\n' +
    'print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else "")';
  const r = spawnSync(python(), ['-c', code], { encoding: 'utf8' });
  if (r.status !== 0) return null;
  const dir = r.stdout.trim();
  return isTorchDir(dir) ? dir : null;
}

function pipInstallLocal() {
  const target = path.join(root, '.torch');
  const dir = path.join(target, 'torch');
  if (isTorchDir(dir)) return dir;
  const base = [ '-m', 'pip', 'install', '--disable-pip-version-check', '--no-deps', '--target', target, 'torch'];
  log(`installing torch with pip into ${target} (a one-time step, ~200 MB for the CPU build)`);
  // A local wheelhouse (pip's find-links) answers at once; only then ask the configured indexes.
  let r = spawnSync(python(), [...base.slice(0, 3), '--no-index', ...base.slice(3)], { stdio: 'inherit' });
  if (r.status !== 0) {
    log('no local torch wheel; asking pip\'s configured index (this downloads torch)');
    r = spawnSync(python(), base, { stdio: 'inherit' });
  }
  return r.status === 0 && isTorchDir(dir) ? dir : null;
}

function findLibtorch() {
  const env = process.env.LIBTORCH;
  if (env) {
    const cands = [env, path.join(env, 'torch')];
    const dir = cands.find(isTorchDir);
    if (!dir) {
      throw new Error(
        `LIBTORCH=${env} is not a libtorch folder: expected include/torch/csrc/api/include/torch/torch.h and lib/libtorch.so ` +
          `inside it. Point LIBTORCH at an unpacked libtorch zip or at a torch package folder (python3 -c "import torch,os;print(os.path.dirname(torch.__file__))").`,
      );
    }
    return { dir, source: 'LIBTORCH environment variable' };
  }
  if (!process.env.TRAIN_LORA_IGNORE_PYTHON_TORCH) {
    const dir = torchFromPython();
    if (dir) return { dir, source: `the torch package of ${python()}` };
  }
  const local = pipInstallLocal();
  if (local) return { dir: local, source: 'a project-local pip install (.torch/)' };
  throw new Error(
    'libtorch was not found. Do one of:\n' +
      '  - python3 -m pip install torch        (then run `npm run build:native` again), or\n' +
      '  - download libtorch (C++ / Linux, cxx11 ABI) from pytorch.org, unzip it and set LIBTORCH=/path/to/libtorch.\n' +
      "Debian/Ubuntu's libtorch-dev is too old (1.13) and is not used.",
  );
}

function cxx11Abi(dir) {
  // Wheels since torch 2.7 and every libtorch "cxx11 ABI" zip use the new ABI. Older pip wheels did not:
  // read the truth from the library's own symbols when nm is available.
  const r = spawnSync('sh', ['-c', `nm -DC "${path.join(dir, 'lib', 'libc10.so')}" | grep -m1 -c "std::__cxx11::basic_string"`], {
    encoding: 'utf8',
  });
  if (r.status === 0 || r.status === 1) return r.stdout.trim() === '0' ? 0 : 1;
  return 1;
}

function main() {
  const { dir, source } = findLibtorch();
  log(`libtorch: ${dir} (from ${source})`);
  if (args.includes('--print-libtorch')) return;
  const abi = cxx11Abi(dir);
  const cuda = fs.existsSync(path.join(dir, 'lib', 'libtorch_cuda.so'));
  log(`building the native addon (${cuda ? 'CPU + CUDA' : 'CPU'}, CXX11 ABI ${abi}); a clean build takes a few minutes`);
  const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
  const jobs = String(Math.max(1, Math.min(require('os').availableParallelism?.() ?? 2, 8)));
  const t0 = Date.now();
  const r = spawnSync(
    process.execPath,
    [cmakeJs, 'build', '-d', root, '-O', path.join(root, 'build'), '-p', jobs, '-m',
      `--CDTORCH_DIR=${dir}`, `--CDTORCH_CXX11_ABI=${abi}`, '-l', 'warn'],
    { stdio: 'inherit', cwd: root },
  );
  if (r.status !== 0) {
    console.error('[train-lora] the native build failed; see the compiler output above. Requirements: CMake >= 3.18, a C++20 compiler (g++ 11+ or clang 14+).');
    process.exit(r.status ?? 1);
  }
  fs.writeFileSync(
    path.join(root, 'build', 'libtorch.json'),
    JSON.stringify({ dir, source, cuda, cxx11Abi: abi, builtAt: new Date().toISOString() }, null, 2) + '\n',
  );
  log(`native addon built in ${((Date.now() - t0) / 1000).toFixed(1)} s: build/Release/train_lora.node`);
}

try {
  main();
} catch (e) {
  console.error(`[train-lora] ${e.message}`);
  process.exit(1);
}
