// libtorch discovery and checks, shared by scripts/build-native.js, scripts/check-cuda-build.sh and src/native.ts.
//
// Nothing here runs a program: every function takes the platform, the environment and the paths it looks at as
// parameters (and file-system state only through those paths), so test/build-discovery.test.ts runs them against
// fake folders. build-native.js supplies the side effects (asking python, pip installs, running cmake).
//
// Layouts understood:
//   - a libtorch folder (unpacked libtorch zip, or a `torch` Python package folder): include/torch/csrc/api/include/
//     torch/torch.h and lib/libtorch.so (Linux) or lib/libtorch.dylib (macOS; the wheel adds lib/libomp.dylib);
//   - the CUDA wheels beside a torch package, site-packages/nvidia/...:
//       cu12: one folder per library: nvidia/cuda_runtime/include, nvidia/cublas/include, nvidia/nccl/include, ...
//       cu13: one merged folder nvidia/cu13/include (+ lib), except a few libraries that keep their own folder:
//             nvidia/nccl/include (nccl.h), nvidia/cudnn, nvidia/cusparselt, nvidia/nvshmem.
//
// Usage as a program: node scripts/libtorch.js DIR   (prints what is found about DIR as JSON)
'use strict';
const fs = require('fs');
const path = require('path');

const LIB_SUFFIX = { linux: '.so', darwin: '.dylib' };
const PLATFORM_NAME = { linux: 'Linux', darwin: 'macOS' };
const TORCH_H = path.join('include', 'torch', 'csrc', 'api', 'include', 'torch', 'torch.h');
// torch <= 2.8 defines TORCH_VERSION_* in the first file; later versions include the second one from it.
const VERSION_HEADERS = [
  path.join('include', 'torch', 'csrc', 'api', 'include', 'torch', 'version.h'),
  path.join('include', 'torch', 'headeronly', 'version.h'),
];
const SDPA_HEADER = path.join('include', 'ATen', 'ops', 'scaled_dot_product_attention.h');
const MIN_TORCH = { major: 2, minor: 1 }; // torch::scaled_dot_product_attention with a scale argument
const MIN_CMAKE = [3, 18];

const exists = (p) => fs.existsSync(p);

/** `lib<name>.so` or `lib<name>.dylib`; throws on a platform the addon is not built for. */
function libFile(name, platform) {
  const suffix = LIB_SUFFIX[platform];
  if (!suffix) throw new Error(`train-lora builds its native addon on Linux and macOS; this platform is ${platform}`);
  return `lib${name}${suffix}`;
}

/** Why `dir` is not a libtorch folder usable on `platform`, or null when it is one. */
function torchDirProblem(dir, platform) {
  if (!dir || !exists(dir)) return `${dir} does not exist`;
  if (!exists(path.join(dir, TORCH_H))) return `${dir} has no ${TORCH_H}`;
  const lib = libFile('torch', platform);
  if (exists(path.join(dir, 'lib', lib))) return null;
  for (const [other, suffix] of Object.entries(LIB_SUFFIX)) {
    if (other !== platform && exists(path.join(dir, 'lib', `libtorch${suffix}`))) {
      return `${dir} is a libtorch for ${PLATFORM_NAME[other]} (lib/libtorch${suffix}), but this machine runs ${PLATFORM_NAME[platform]}`;
    }
  }
  return `${dir} has no lib/${lib}`;
}

/**
 * The libtorch folder a user pointed at: `p` itself, or `p/torch` (a site-packages folder, a pip --target folder).
 * Returns { dir } or { problem }.
 */
function resolveTorchDir(p, platform) {
  const problem = torchDirProblem(p, platform);
  if (!problem) return { dir: p };
  const sub = path.join(p, 'torch');
  if (!exists(sub)) return { problem };
  const subProblem = torchDirProblem(sub, platform);
  return subProblem ? { problem: subProblem } : { dir: sub };
}

/** { major, minor, patch } from libtorch's version headers, or null when they are missing or unreadable. */
function torchVersion(dir) {
  for (const rel of VERSION_HEADERS) {
    let text;
    try {
      text = fs.readFileSync(path.join(dir, rel), 'utf8');
    } catch {
      continue;
    }
    const num = (part) => {
      const m = new RegExp(`#define\\s+TORCH_VERSION_${part}\\s+(\\d+)`).exec(text);
      return m ? Number(m[1]) : null;
    };
    const major = num('MAJOR');
    const minor = num('MINOR');
    if (major !== null && minor !== null) return { major, minor, patch: num('PATCH') ?? 0 };
  }
  return null;
}

const versionText = (v) => `${v.major}.${v.minor}.${v.patch}`;

/** What makes libtorch at `dir` unusable for train-lora (old version, no SDPA): a list of sentences, empty when fine. */
function torchProblems(dir) {
  const problems = [];
  const v = torchVersion(dir);
  if (!v) {
    problems.push(`cannot read the libtorch version: none of ${VERSION_HEADERS.join(', ')} defines TORCH_VERSION_MAJOR/MINOR in ${dir}`);
  } else if (v.major < MIN_TORCH.major || (v.major === MIN_TORCH.major && v.minor < MIN_TORCH.minor)) {
    problems.push(
      `libtorch ${versionText(v)} in ${dir} is too old: train-lora needs libtorch ${MIN_TORCH.major}.${MIN_TORCH.minor} or newer ` +
        `(for scaled_dot_product_attention). Debian/Ubuntu's libtorch-dev (1.13) is too old as well.`,
    );
  }
  if (!exists(path.join(dir, SDPA_HEADER))) {
    problems.push(`${dir} has no ${SDPA_HEADER}: this libtorch lacks scaled_dot_product_attention (or its headers are incomplete)`);
  }
  return problems;
}

/**
 * The C++ standard library ABI of libc10 (Linux): 'cxx11' (libstdc++'s std::__cxx11 strings: every libtorch zip
 * marked "cxx11 ABI" and pip wheels since torch 2.7), 'pre-cxx11' (older pip wheels) or 'libc++' (LLVM's library,
 * std::__1: cannot be linked from a libstdc++ build). Read from the library's bytes: the mangled names of its
 * symbols contain "St7__cxx11" or "St3__1" (no nm needed). null on macOS, where libc++ is the only ABI.
 */
function cxxAbi(dir, platform) {
  if (platform !== 'linux') return null;
  const bytes = fs.readFileSync(path.join(dir, 'lib', libFile('c10', platform)));
  if (bytes.includes('St7__cxx11')) return 'cxx11';
  if (bytes.includes('St3__1')) return 'libc++';
  return 'pre-cxx11';
}

/** The CPU a shared library was built for, as process.arch spells it, or null when unknown (or a universal binary). */
function libraryArch(file) {
  const head = Buffer.alloc(20);
  const fd = fs.openSync(file, 'r');
  let n;
  try {
    n = fs.readSync(fd, head, 0, head.length, 0);
  } finally {
    fs.closeSync(fd);
  }
  if (n < head.length) return null;
  if (head.readUInt32BE(0) === 0x7f454c46 && head[5] === 1) {
    // little-endian ELF: e_machine at byte 18
    return { 0x03: 'ia32', 0x28: 'arm', 0x3e: 'x64', 0xb7: 'arm64', 0x15: 'ppc64', 0x16: 's390x', 0xf3: 'riscv64' }[head.readUInt16LE(18)] ?? null;
  }
  if (head.readUInt32LE(0) === 0xfeedfacf) {
    // 64-bit Mach-O: cputype at byte 4
    return { 0x01000007: 'x64', 0x0100000c: 'arm64' }[head.readUInt32LE(4)] ?? null;
  }
  return null;
}

/**
 * The problem that keeps this libtorch's C++ libraries from linking into an addon built here, or null:
 * a library for another CPU, or one built with a C++ standard library that g++ cannot link against.
 */
function binaryProblem(dir, platform, arch) {
  const c10 = path.join(dir, 'lib', libFile('c10', platform));
  if (!exists(c10)) return `${dir} has no lib/${libFile('c10', platform)}`;
  const libArch = libraryArch(c10);
  if (libArch && libArch !== arch) return `${c10} is built for ${libArch}, but this machine is ${arch}: use a libtorch for ${arch}`;
  if (cxxAbi(dir, platform) === 'libc++') {
    return (
      `${c10} was built with LLVM's libc++ (std::__1), a C++ ABI that an addon built with libstdc++ on Linux cannot link against: ` +
      'use a libtorch from pytorch.org (cxx11 ABI) or a torch pip wheel'
    );
  }
  return null;
}

// ---------------------------------------------------------------- CUDA

/**
 * What native/runtime/distributed.cpp needs to compile ProcessGroupNCCL.hpp, found with `g++ -M` on torch 2.14.1 (cu13):
 * NCCLUtils.hpp -> ATen/cuda/CUDAEvent.h -> cuda_runtime_api.h, cuda_fp16.h (-> nv/target, crt/host_config.h), and
 * ATen/cuda/CUDAContextLight.h -> cublas_v2.h, cublasLt.h, cusparse.h, cusolverDn.h. `pip` names the wheel that ships
 * each header (cu13 / cu12). torch depends on neither nvidia-cuda-crt nor nvidia-cuda-cccl, so a plain pip install
 * of a CUDA torch lacks crt/ and nv/: NCCL then stays off and distributed CUDA training uses gloo.
 * The CMake fallback in CMakeLists.txt (for a cmake run without this script) looks for the same headers.
 */
const NCCL_HEADERS = [
  { header: 'nccl.h', pip: { cu13: 'nvidia-nccl-cu13', cu12: 'nvidia-nccl-cu12' } },
  { header: 'cuda_runtime_api.h', pip: { cu13: 'nvidia-cuda-runtime', cu12: 'nvidia-cuda-runtime-cu12' } },
  { header: 'crt/host_config.h', pip: { cu13: 'nvidia-cuda-crt', cu12: 'nvidia-cuda-nvcc-cu12' } },
  { header: 'nv/target', pip: { cu13: 'nvidia-cuda-cccl', cu12: 'nvidia-cuda-cccl-cu12' } },
  { header: 'cublas_v2.h', pip: { cu13: 'nvidia-cublas', cu12: 'nvidia-cublas-cu12' } },
  { header: 'cublasLt.h', pip: { cu13: 'nvidia-cublas', cu12: 'nvidia-cublas-cu12' } },
  { header: 'cusparse.h', pip: { cu13: 'nvidia-cusparse', cu12: 'nvidia-cusparse-cu12' } },
  { header: 'cusolverDn.h', pip: { cu13: 'nvidia-cusolver', cu12: 'nvidia-cusolver-cu12' } },
];

/** Where a CUDA toolkit or libnccl-dev puts headers when no wheel has them. */
const SYSTEM_CUDA_INCLUDE_DIRS = ['/usr/local/cuda/include', '/usr/include'];
/** Searched by every compiler anyway: never passed as -I (that would reorder the system headers). */
const COMPILER_DEFAULT_DIRS = new Set(['/usr/include']);

/** 'cu13', 'cu12' or null: how the nvidia-* wheels beside a torch package are laid out (null: none there). */
function cudaWheelLayout(torchDir) {
  const nvidia = path.join(torchDir, '..', 'nvidia');
  if (exists(path.join(nvidia, 'cu13', 'include')) || exists(path.join(nvidia, 'cu13', 'lib'))) return 'cu13';
  if (exists(path.join(nvidia, 'cuda_runtime'))) return 'cu12';
  return null;
}

/** Folders searched for the CUDA headers, in order: explicit environment, the wheels beside torch, the system. */
function cudaIncludeCandidates(torchDir, env, systemDirs) {
  const dirs = [];
  if (env.NCCL_INCLUDE_DIR) dirs.push(env.NCCL_INCLUDE_DIR);
  for (const v of ['CUDA_HOME', 'CUDA_PATH']) if (env[v]) dirs.push(path.join(env[v], 'include'));
  const nvidia = path.join(torchDir, '..', 'nvidia');
  let libs = [];
  try {
    libs = fs.readdirSync(nvidia).sort();
  } catch {
    // no wheels beside torch (a libtorch zip, or a CPU torch)
  }
  // cu13's merged folder first; then cu12's (and cu13's leftover) one-folder-per-library layout.
  if (libs.includes('cu13')) dirs.push(path.join(nvidia, 'cu13', 'include'));
  for (const lib of libs) if (lib !== 'cu13') dirs.push(path.join(nvidia, lib, 'include'));
  dirs.push(...systemDirs);
  // CUDA 13 keeps CCCL (nv/target, cub, thrust) in include/cccl (its wheel also puts a copy in include/).
  return dirs.flatMap((d) => [d, path.join(d, 'cccl')]).filter((d) => exists(d));
}

/**
 * The CUDA side of the libtorch at `torchDir`:
 *   cuda        it has the CUDA backend (lib/libtorch_cuda.so);
 *   wheels      'cu13' | 'cu12' | null, the layout of the nvidia-* wheels beside it;
 *   nccl        { enabled, includeDirs, missing }: ProcessGroupNCCL is compiled in only when every header in
 *               NCCL_HEADERS is found; includeDirs are the folders to add (in search order), missing lists
 *               { header, pip } for the ones that are not.
 * options: { platform, env (NCCL_INCLUDE_DIR, CUDA_HOME, CUDA_PATH), systemDirs (default SYSTEM_CUDA_INCLUDE_DIRS) }.
 */
function cudaLayout(torchDir, { platform, env = {}, systemDirs = SYSTEM_CUDA_INCLUDE_DIRS }) {
  const cuda = exists(path.join(torchDir, 'lib', libFile('torch_cuda', platform)));
  const wheels = cudaWheelLayout(torchDir);
  const nccl = { enabled: false, includeDirs: [], missing: [] };
  if (!cuda) return { cuda, wheels, nccl };
  const candidates = cudaIncludeCandidates(torchDir, env, systemDirs);
  for (const need of NCCL_HEADERS) {
    const dir = candidates.find((d) => exists(path.join(d, need.header)));
    if (!dir) nccl.missing.push({ header: need.header, pip: wheels ? need.pip[wheels] : `${need.pip.cu13} / ${need.pip.cu12}` });
    else if (!COMPILER_DEFAULT_DIRS.has(dir) && !nccl.includeDirs.includes(dir)) nccl.includeDirs.push(dir);
  }
  nccl.enabled = nccl.missing.length === 0;
  if (!nccl.enabled) nccl.includeDirs = [];
  return { cuda, wheels, nccl };
}

/** One line for the build log: whether NCCL is compiled in, and if not, what to install for it. */
function ncclSummary(layout, torchDir) {
  if (!layout.cuda) return 'NCCL: no (a CPU libtorch)';
  if (layout.nccl.enabled) return `NCCL: yes (CUDA headers from ${layout.nccl.includeDirs.join(', ') || 'the system'})`;
  const headers = layout.nccl.missing.map((m) => m.header).join(', ');
  const pkgs = [...new Set(layout.nccl.missing.map((m) => m.pip))].join(' ');
  const where = layout.wheels
    ? `the pip package(s) ${pkgs} where torch is (${path.dirname(torchDir)})`
    : `a CUDA toolkit and NCCL (or the pip packages ${pkgs}) and set CUDA_HOME (and NCCL_INCLUDE_DIR)`;
  return `NCCL: no, distributed CUDA training will use gloo: ${headers} not found. For NCCL, install ${where}, then rebuild`;
}

/** The -D variables CMakeLists.txt takes from the discovery (list values joined with ';', CMake's list separator). */
function cmakeVariables({ dir, abi, layout }) {
  const vars = { TORCH_DIR: dir };
  if (abi) vars.TORCH_CXX11_ABI = abi === 'cxx11' ? '1' : '0';
  if (layout.cuda) {
    vars.TL_NCCL = layout.nccl.enabled ? 'ON' : 'OFF';
    vars.TL_NCCL_INCLUDE_DIRS = layout.nccl.includeDirs.join(';');
    if (!layout.nccl.enabled) vars.TL_NCCL_MISSING = layout.nccl.missing.map((m) => m.header).join(' ');
  }
  return vars;
}

// ---------------------------------------------------------------- the search order

/**
 * Picks libtorch in the documented order and returns { dir, source, skipped }; throws an Error that says what to do.
 *   1. env.LIBTORCH (a libtorch folder, a torch package folder or the site-packages above it): used or rejected,
 *      never skipped;
 *   2. the torch package of python (o.pythonTorch() -> its folder or null, found without importing it), unless
 *      env.TRAIN_LORA_IGNORE_PYTHON_TORCH; skipped (reason in `skipped`) when unusable, e.g. too old;
 *   3. o.installLocal() -> the folder of a project-local pip install (.torch/torch) or null.
 */
function findLibtorch({ env, platform, pythonName = 'python3', pythonTorch, installLocal }) {
  const skipped = [];
  if (env.LIBTORCH) {
    const r = resolveTorchDir(env.LIBTORCH, platform);
    if (r.problem) {
      throw new Error(
        `LIBTORCH=${env.LIBTORCH} is not a libtorch folder: ${r.problem}. It needs ${TORCH_H} and lib/${libFile('torch', platform)}. ` +
          `Point LIBTORCH at an unpacked libtorch zip or at a torch package folder (${pythonName} -c "import torch,os;print(os.path.dirname(torch.__file__))").`,
      );
    }
    const problems = torchProblems(r.dir);
    if (problems.length) throw new Error(`LIBTORCH=${env.LIBTORCH}: ${problems.join('; ')}`);
    return { dir: r.dir, source: 'LIBTORCH environment variable', skipped };
  }
  if (!env.TRAIN_LORA_IGNORE_PYTHON_TORCH) {
    const found = pythonTorch();
    if (found) {
      const r = resolveTorchDir(found, platform);
      const problems = r.problem ? [r.problem] : torchProblems(r.dir);
      if (!problems.length) return { dir: r.dir, source: `the torch package of ${pythonName}`, skipped };
      skipped.push(`the torch package of ${pythonName} is not usable: ${problems.join('; ')}`);
    }
  }
  const local = installLocal();
  if (local) {
    const r = resolveTorchDir(local, platform);
    const problems = r.problem ? [r.problem] : torchProblems(r.dir);
    if (problems.length) throw new Error(`the project-local torch (${local}) is not usable: ${problems.join('; ')}`);
    return { dir: r.dir, source: 'a project-local pip install (.torch/)', skipped };
  }
  throw new Error(
    [
      ...skipped,
      'libtorch was not found. Do one of:',
      `  - ${pythonName} -m pip install torch        (then run \`npm run build:native\` again), or`,
      `  - download libtorch (C++ / ${PLATFORM_NAME[platform] ?? platform}${platform === 'linux' ? ', cxx11 ABI' : ''}) from pytorch.org, unzip it and set LIBTORCH=/path/to/libtorch.`,
      "Debian/Ubuntu's libtorch-dev is too old (1.13) and is not used.",
    ].join('\n'),
  );
}

// ---------------------------------------------------------------- tools

/** Why the CMake whose `cmake --version` printed `output` cannot build the addon (null: fine; output null: no cmake). */
function cmakeProblem(output) {
  const install = 'install CMake 3.18 or newer (Debian/Ubuntu: apt-get install cmake; macOS: brew install cmake; anywhere: python3 -m pip install cmake)';
  if (output == null) return `CMake was not found on PATH: ${install}`;
  const m = /cmake version (\d+)\.(\d+)(?:\.(\d+))?/.exec(output);
  if (!m) return `could not read the CMake version from \`cmake --version\` ("${output.trim().split('\n')[0]}"): ${install}`;
  const [major, minor] = [Number(m[1]), Number(m[2])];
  if (major < MIN_CMAKE[0] || (major === MIN_CMAKE[0] && minor < MIN_CMAKE[1])) return `CMake ${major}.${minor} is too old: ${install}`;
  return null;
}

/**
 * The C++ compiler whose `--version` printed `output`: { kind: 'gcc' | 'clang' | 'apple-clang' | 'unknown', major,
 * problem, warning }. A problem stops the build (g++ on macOS: libtorch there is built with clang and libc++);
 * a warning does not (older than the tested g++ 11 / clang 14 may still compile C++20 well enough).
 */
function compilerCheck(output, platform) {
  const first = output.trim().split('\n')[0];
  let kind = 'unknown';
  let m;
  if ((m = /Apple clang version (\d+)/.exec(first))) kind = 'apple-clang';
  else if ((m = /clang version (\d+)/.exec(first))) kind = 'clang';
  // "g++ (Debian 12.2.0-14) 12.2.0", "c++ (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)", "g++-13 (Homebrew GCC 13.2.0) 13.2.0"
  else if (/g\+\+|gcc|c\+\+|GCC/.test(first) && (m = /\)\s+(\d+)\.\d+/.exec(first))) kind = 'gcc';
  const major = m ? Number(m[1]) : null;
  let problem = null;
  let warning = null;
  if (platform === 'darwin' && kind === 'gcc') {
    problem = `the C++ compiler is GCC (${first}), but libtorch on macOS is built with clang and libc++: unset CXX or set CXX=clang++`;
  } else if (major !== null && ((kind === 'gcc' && major < 11) || (kind === 'clang' && major < 14) || (kind === 'apple-clang' && major < 14))) {
    warning = `${first}: train-lora is tested with g++ 11+ and clang 14+ (C++20); this compiler may fail on it`;
  }
  return { kind, major, problem, warning };
}

/** Message when no C++ compiler answered `--version` (tried: the names that were run). */
function noCompilerMessage(tried, platform) {
  const install = platform === 'darwin' ? 'xcode-select --install' : 'Debian/Ubuntu: sudo apt-get install g++; Fedora: sudo dnf install gcc-c++';
  return `no C++ compiler found (tried ${tried.join(', ')}): install one (${install}) or set CXX to its path`;
}

// ---------------------------------------------------------------- load failures

// pip package bases of the CUDA libraries libtorch_cuda loads (CUDA 13 name / CUDA 12 name).
const CUDA_LIB_PACKAGES = [
  [/^libcudart\b/, 'nvidia-cuda-runtime', 'nvidia-cuda-runtime-cu12'],
  [/^libcublas(Lt)?\b/, 'nvidia-cublas', 'nvidia-cublas-cu12'],
  [/^libcudnn/, 'nvidia-cudnn-cu13', 'nvidia-cudnn-cu12'],
  [/^libcusparseLt\b/, 'nvidia-cusparselt-cu13', 'nvidia-cusparselt-cu12'],
  [/^libcusparse\b/, 'nvidia-cusparse', 'nvidia-cusparse-cu12'],
  [/^libcufft/, 'nvidia-cufft', 'nvidia-cufft-cu12'],
  [/^libcurand\b/, 'nvidia-curand', 'nvidia-curand-cu12'],
  [/^libcusolver/, 'nvidia-cusolver', 'nvidia-cusolver-cu12'],
  [/^libnccl\b/, 'nvidia-nccl-cu13', 'nvidia-nccl-cu12'],
  [/^libnvrtc/, 'nvidia-cuda-nvrtc', 'nvidia-cuda-nvrtc-cu12'],
  [/^libnvJitLink\b/, 'nvidia-nvjitlink', 'nvidia-nvjitlink-cu12'],
  [/^libnvshmem/, 'nvidia-nvshmem-cu13', 'nvidia-nvshmem-cu12'],
  [/^libcupti\b/, 'nvidia-cuda-cupti', 'nvidia-cuda-cupti-cu12'],
  [/^libnvToolsExt|^libnvtx/, 'nvidia-nvtx', 'nvidia-nvtx-cu12'],
  [/^libcufile/, 'nvidia-cufile', 'nvidia-cufile-cu12'],
];

/**
 * A sentence that says why the addon could not be loaded and what to do, from the loader's error message
 * (Linux dlopen or macOS dyld wording), or null when the message is not one of the known cases.
 */
function explainLoadFailure(message) {
  const missing =
    /(lib[\w.+-]+?\.so[\d.]*): cannot open shared object file/.exec(message) ??
    /Library not loaded: \S*?(lib[\w.+-]+?\.dylib)/.exec(message);
  if (missing) {
    const lib = missing[1];
    const cuda = CUDA_LIB_PACKAGES.find(([re]) => re.test(lib));
    if (cuda) {
      return (
        `The addon was built against a CUDA build of libtorch, and the CUDA library ${lib} it needs was not found. ` +
        `pip installs the CUDA libraries as nvidia-* packages beside torch (site-packages/nvidia/...), where libtorch finds ` +
        `them without LD_LIBRARY_PATH: install ${cuda[1]} (CUDA 13 torch) or ${cuda[2]} (CUDA 12 torch) there, e.g. by ` +
        `reinstalling torch with its dependencies (python3 -m pip install torch, without --no-deps). Or rebuild the addon ` +
        `against a CPU libtorch: LIBTORCH=/path/to/cpu/torch npm run build:native. (No GPU or NVIDIA driver is needed to load it.)`
      );
    }
    if (/^lib(torch|c10|shm|gomp|omp)/.test(lib)) {
      return `The addon cannot find ${lib}: the libtorch it was built against has moved or was removed. Rebuild it with \`npm run build:native\` (it finds the libtorch installed now), or set LIBTORCH first.`;
    }
    return `The addon needs ${lib}, which is not installed here. Install the package that provides it, or rebuild the addon with \`npm run build:native\`.`;
  }
  const symbol = /undefined symbol: (\S+)/.exec(message) ?? /Symbol not found: (\S+)/.exec(message);
  if (symbol) {
    return (
      `The addon and the libtorch it loaded disagree (undefined symbol ${symbol[1]}): it is a different libtorch version, or one ` +
      'with another C++ ABI, than the one the addon was compiled against. Rebuild with `npm run build:native`.'
    );
  }
  return null;
}

module.exports = {
  MIN_TORCH,
  MIN_CMAKE,
  NCCL_HEADERS,
  SYSTEM_CUDA_INCLUDE_DIRS,
  libFile,
  torchDirProblem,
  resolveTorchDir,
  torchVersion,
  torchProblems,
  cxxAbi,
  libraryArch,
  binaryProblem,
  cudaWheelLayout,
  cudaLayout,
  ncclSummary,
  cmakeVariables,
  findLibtorch,
  cmakeProblem,
  compilerCheck,
  noCompilerMessage,
  explainLoadFailure,
};

if (require.main === module) {
  const arg = process.argv[2];
  if (!arg) {
    console.error('usage: node scripts/libtorch.js DIR');
    process.exit(2);
  }
  const r = resolveTorchDir(path.resolve(arg), process.platform);
  if (r.problem) {
    console.error(r.problem);
    process.exit(1);
  }
  const v = torchVersion(r.dir);
  console.log(
    JSON.stringify(
      {
        dir: r.dir,
        version: v && versionText(v),
        problems: torchProblems(r.dir),
        abi: cxxAbi(r.dir, process.platform),
        ...cudaLayout(r.dir, { platform: process.platform, env: process.env }),
      },
      null,
      2,
    ),
  );
}
