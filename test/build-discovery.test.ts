/**
 * libtorch discovery (scripts/libtorch.js, used by scripts/build-native.js) against fake folders: Linux and macOS
 * libtorch layouts, the cu12 and cu13 layouts of pip's nvidia-* wheels, the NCCL decision handed to CMake, and the
 * messages for bad input (old or incomplete libtorch, wrong platform/CPU/C++ ABI, CMake, compiler, load failures).
 * Only file layouts are faked (mostly empty files); nothing is compiled.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import * as lt from '../scripts/libtorch';
import { loadFailureHint, native } from '../src/native';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-discovery-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

let serial = 0;
function fresh(name: string): string {
  const dir = path.join(tmp, `${++serial}-${name}`);
  fs.mkdirSync(dir, { recursive: true });
  return dir;
}

function touch(file: string, content: string | Buffer = ''): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, content);
}

interface FakeTorch {
  platform?: 'linux' | 'darwin';
  version?: [number, number, number];
  /** Where TORCH_VERSION_* are defined: the csrc header (torch <= 2.8) or headeronly/ (newer). */
  versionIn?: 'csrc' | 'headeronly' | 'nowhere';
  sdpa?: boolean;
  cuda?: boolean;
  /** Bytes that stand for libc10's symbol names. */
  c10?: string | Buffer;
}

/** A libtorch folder: a torch package's (site/torch) when `site` is given, else an unpacked zip's. */
function fakeTorch(dir: string, o: FakeTorch = {}): string {
  const { platform = 'linux', version = [2, 14, 1], versionIn = 'headeronly', sdpa = true, cuda = false } = o;
  const so = platform === 'darwin' ? '.dylib' : '.so';
  touch(path.join(dir, 'include/torch/csrc/api/include/torch/torch.h'));
  const defines = `#define TORCH_VERSION_MAJOR ${version[0]}\n\n#define TORCH_VERSION_MINOR ${version[1]}\n\n#define TORCH_VERSION_PATCH ${version[2]}\n`;
  touch(path.join(dir, 'include/torch/csrc/api/include/torch/version.h'), versionIn === 'csrc' ? defines : '#include <torch/headeronly/version.h>\n');
  if (versionIn === 'headeronly') touch(path.join(dir, 'include/torch/headeronly/version.h'), defines);
  if (sdpa) touch(path.join(dir, 'include/ATen/ops/scaled_dot_product_attention.h'));
  for (const lib of ['torch', 'torch_cpu', 'c10', ...(cuda ? ['torch_cuda', 'c10_cuda'] : [])]) touch(path.join(dir, 'lib', `lib${lib}${so}`));
  touch(path.join(dir, 'lib', `libc10${so}`), o.c10 ?? (platform === 'linux' ? '_ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE' : ''));
  if (platform === 'darwin') touch(path.join(dir, 'lib/libomp.dylib'));
  return dir;
}

// Headers as the wheels ship them (from the real torch 2.14.1 cu13 wheels; cu12 as nvidia-*-cu12 lay them out).
function cu13Wheels(site: string, { crt = true, cccl = true } = {}): void {
  const inc = path.join(site, 'nvidia/cu13/include');
  for (const h of ['cuda_runtime_api.h', 'cuda_runtime.h', 'cublas_v2.h', 'cublasLt.h', 'cusparse.h', 'cusolverDn.h']) touch(path.join(inc, h));
  if (crt) touch(path.join(inc, 'crt/host_config.h'));
  if (cccl) {
    touch(path.join(inc, 'nv/target'));
    touch(path.join(inc, 'cccl/nv/target'));
  }
  touch(path.join(site, 'nvidia/cu13/lib/libcudart.so.13'));
  touch(path.join(site, 'nvidia/nccl/include/nccl.h'));
  touch(path.join(site, 'nvidia/nccl/lib/libnccl.so.2'));
  touch(path.join(site, 'nvidia/cudnn/include/cudnn.h'));
}

function cu12Wheels(site: string, { nccl = true } = {}): void {
  const lib = (name: string, headers: string[]) => {
    for (const h of headers) touch(path.join(site, 'nvidia', name, 'include', h));
    touch(path.join(site, 'nvidia', name, 'lib', '.keep'));
  };
  lib('cuda_runtime', ['cuda_runtime_api.h', 'cuda_runtime.h']);
  lib('cuda_nvcc', ['crt/host_config.h']);
  lib('cuda_cccl', ['nv/target']);
  lib('cublas', ['cublas_v2.h', 'cublasLt.h']);
  lib('cusparse', ['cusparse.h']);
  lib('cusolver', ['cusolverDn.h']);
  if (nccl) lib('nccl', ['nccl.h']);
}

const hermetic = { env: {}, systemDirs: [] as string[] };

describe('libtorch folders', () => {
  test('a Linux libtorch zip, a torch package and the site-packages above it', () => {
    const zip = fakeTorch(fresh('libtorch'));
    expect(lt.resolveTorchDir(zip, 'linux')).toEqual({ dir: zip });
    const site = fresh('site');
    const pkg = fakeTorch(path.join(site, 'torch'));
    expect(lt.resolveTorchDir(pkg, 'linux')).toEqual({ dir: pkg });
    expect(lt.resolveTorchDir(site, 'linux')).toEqual({ dir: pkg });
    expect(lt.libFile('torch_cuda', 'linux')).toBe('libtorch_cuda.so');
  });

  test('a macOS layout (lib/*.dylib) is found on macOS and named as such on Linux', () => {
    const mac = fakeTorch(fresh('mac-torch'), { platform: 'darwin' });
    expect(lt.resolveTorchDir(mac, 'darwin')).toEqual({ dir: mac });
    expect(lt.libFile('c10', 'darwin')).toBe('libc10.dylib');
    expect(lt.resolveTorchDir(mac, 'linux').problem).toBe(`${mac} is a libtorch for macOS (lib/libtorch.dylib), but this machine runs Linux`);
    const linux = fakeTorch(fresh('linux-torch'));
    expect(lt.torchDirProblem(linux, 'darwin')).toBe(`${linux} is a libtorch for Linux (lib/libtorch.so), but this machine runs macOS`);
    expect(() => lt.libFile('torch', 'win32')).toThrow(/Linux and macOS; this platform is win32/);
  });

  test('incomplete folders say what is missing', () => {
    const noHeaders = fresh('no-headers');
    touch(path.join(noHeaders, 'lib/libtorch.so'));
    expect(lt.torchDirProblem(noHeaders, 'linux')).toMatch(/has no include\/torch\/csrc\/api\/include\/torch\/torch\.h$/);
    const noLib = fresh('no-lib');
    touch(path.join(noLib, 'include/torch/csrc/api/include/torch/torch.h'));
    expect(lt.torchDirProblem(noLib, 'linux')).toBe(`${noLib} has no lib/libtorch.so`);
    expect(lt.torchDirProblem(path.join(tmp, 'absent'), 'linux')).toMatch(/does not exist$/);
  });

  test('the version is read from either version header; old or SDPA-less libtorch is refused', () => {
    expect(lt.torchVersion(fakeTorch(fresh('v-csrc'), { version: [2, 1, 2], versionIn: 'csrc' }))).toEqual({ major: 2, minor: 1, patch: 2 });
    const v214 = fakeTorch(fresh('v-headeronly'));
    expect(lt.torchVersion(v214)).toEqual({ major: 2, minor: 14, patch: 1 });
    expect(lt.torchProblems(v214)).toEqual([]);

    const old = fakeTorch(fresh('v-old'), { version: [1, 13, 1], versionIn: 'csrc', sdpa: false });
    const problems = lt.torchProblems(old);
    expect(problems).toHaveLength(2);
    expect(problems[0]).toBe(
      `libtorch 1.13.1 in ${old} is too old: train-lora needs libtorch 2.1 or newer (for scaled_dot_product_attention). ` +
        "Debian/Ubuntu's libtorch-dev (1.13) is too old as well.",
    );
    expect(problems[1]).toMatch(/has no include\/ATen\/ops\/scaled_dot_product_attention\.h: this libtorch lacks scaled_dot_product_attention/);
    expect(lt.torchProblems(fakeTorch(fresh('v-2.0'), { version: [2, 0, 1], versionIn: 'csrc' }))[0]).toMatch(/^libtorch 2\.0\.1 .* too old/);
    expect(lt.torchProblems(fakeTorch(fresh('v-none'), { versionIn: 'nowhere' }))[0]).toMatch(/^cannot read the libtorch version/);
  });

  test('C++ ABI and CPU of libc10', () => {
    expect(lt.cxxAbi(fakeTorch(fresh('abi-new')), 'linux')).toBe('cxx11');
    expect(lt.cxxAbi(fakeTorch(fresh('abi-old'), { c10: '_ZN3c105Error4whatEv Ss' }), 'linux')).toBe('pre-cxx11');
    const libcxx = fakeTorch(fresh('abi-libcxx'), { c10: '_ZNKSt3__112basic_stringIcNS_11char_traitsIcEENS_9allocatorIcEEE' });
    expect(lt.cxxAbi(libcxx, 'linux')).toBe('libc++');
    expect(lt.binaryProblem(libcxx, 'linux', 'x64')).toMatch(/built with LLVM's libc\+\+ \(std::__1\), a C\+\+ ABI that an addon built with libstdc\+\+/);
    expect(lt.cxxAbi(fakeTorch(fresh('abi-mac'), { platform: 'darwin' }), 'darwin')).toBeNull();

    // ELF header of an aarch64 library: magic, 64-bit, little-endian, ..., e_machine 0xb7 at byte 18.
    const elf = Buffer.alloc(64);
    Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]).copy(elf);
    elf.writeUInt16LE(0xb7, 18);
    const arm = fakeTorch(fresh('arm64'), { c10: Buffer.concat([elf, Buffer.from('St7__cxx11')]) });
    expect(lt.libraryArch(path.join(arm, 'lib/libc10.so'))).toBe('arm64');
    expect(lt.binaryProblem(arm, 'linux', 'x64')).toBe(`${path.join(arm, 'lib/libc10.so')} is built for arm64, but this machine is x64: use a libtorch for x64`);
    expect(lt.binaryProblem(arm, 'linux', 'arm64')).toBeNull();
    // Mach-O x86_64 on an arm64 Mac
    const macho = Buffer.alloc(32);
    macho.writeUInt32LE(0xfeedfacf, 0);
    macho.writeUInt32LE(0x01000007, 4);
    const intelMac = fakeTorch(fresh('mac-x64'), { platform: 'darwin', c10: macho });
    expect(lt.binaryProblem(intelMac, 'darwin', 'arm64')).toMatch(/is built for x64, but this machine is arm64/);
    // empty fake libraries: unknown CPU, no complaint
    expect(lt.binaryProblem(fakeTorch(fresh('plain')), 'linux', 'x64')).toBeNull();
  });
});

describe('the search order', () => {
  const never = () => {
    throw new Error('must not be asked');
  };

  test('LIBTORCH wins and is never skipped silently', () => {
    const site = fresh('env-site');
    const pkg = fakeTorch(path.join(site, 'torch'));
    expect(lt.findLibtorch({ env: { LIBTORCH: site }, platform: 'linux', pythonTorch: never, installLocal: never })).toEqual({
      dir: pkg,
      source: 'LIBTORCH environment variable',
      skipped: [],
    });
    const bad = fresh('env-bad');
    expect(() => lt.findLibtorch({ env: { LIBTORCH: bad }, platform: 'linux', pythonTorch: never, installLocal: never })).toThrow(
      `LIBTORCH=${bad} is not a libtorch folder: ${bad} has no include/torch/csrc/api/include/torch/torch.h. It needs include/torch/csrc/api/include/torch/torch.h and lib/libtorch.so.`,
    );
    const old = fakeTorch(fresh('env-old'), { version: [1, 13, 0], versionIn: 'csrc' });
    expect(() => lt.findLibtorch({ env: { LIBTORCH: old }, platform: 'linux', pythonTorch: never, installLocal: never })).toThrow(
      /^LIBTORCH=.*: libtorch 1\.13\.0 .* is too old/,
    );
  });

  test("python's torch comes next; an unusable one is skipped with the reason, then the local install", () => {
    const py = fakeTorch(fresh('py-torch'));
    expect(lt.findLibtorch({ env: {}, platform: 'linux', pythonName: 'python3.12', pythonTorch: () => py, installLocal: never })).toEqual({
      dir: py,
      source: 'the torch package of python3.12',
      skipped: [],
    });
    const oldPy = fakeTorch(fresh('py-old'), { version: [2, 0, 0], versionIn: 'csrc' });
    const local = fresh('dot-torch');
    const localPkg = fakeTorch(path.join(local, 'torch'));
    const r = lt.findLibtorch({ env: {}, platform: 'linux', pythonTorch: () => oldPy, installLocal: () => local });
    expect(r.dir).toBe(localPkg);
    expect(r.source).toBe('a project-local pip install (.torch/)');
    expect(r.skipped).toEqual([expect.stringMatching(/^the torch package of python3 is not usable: libtorch 2\.0\.0 .* too old/)]);
    // TRAIN_LORA_IGNORE_PYTHON_TORCH: python is not asked
    expect(lt.findLibtorch({ env: { TRAIN_LORA_IGNORE_PYTHON_TORCH: '1' }, platform: 'linux', pythonTorch: never, installLocal: () => local }).dir).toBe(localPkg);
  });

  test('nothing found: the error says what to do', () => {
    expect(() => lt.findLibtorch({ env: {}, platform: 'linux', pythonTorch: () => null, installLocal: () => null })).toThrow(
      /^libtorch was not found\. Do one of:\n {2}- python3 -m pip install torch .*\n {2}- download libtorch \(C\+\+ \/ Linux, cxx11 ABI\) from pytorch\.org.*LIBTORCH=\/path\/to\/libtorch\.\nDebian\/Ubuntu's libtorch-dev is too old/s,
    );
    expect(() => lt.findLibtorch({ env: {}, platform: 'darwin', pythonTorch: () => null, installLocal: () => null })).toThrow(/C\+\+ \/ macOS\)/);
  });
});

describe('CUDA wheels and the NCCL decision', () => {
  test('a CPU libtorch: no CUDA, no NCCL variables for CMake', () => {
    const dir = fakeTorch(fresh('cpu'));
    const layout = lt.cudaLayout(dir, { platform: 'linux', ...hermetic });
    expect(layout).toEqual({ cuda: false, wheels: null, nccl: { enabled: false, includeDirs: [], missing: [] } });
    expect(lt.cmakeVariables({ dir, abi: 'cxx11', layout })).toEqual({ TORCH_DIR: dir, TORCH_CXX11_ABI: '1' });
    expect(lt.ncclSummary(layout, dir)).toBe('NCCL: no (a CPU libtorch)');
  });

  test('cu13 wheels: one merged nvidia/cu13/include, nccl.h in nvidia/nccl/include', () => {
    const site = fresh('cu13');
    const dir = fakeTorch(path.join(site, 'torch'), { cuda: true });
    cu13Wheels(site);
    const layout = lt.cudaLayout(dir, { platform: 'linux', ...hermetic });
    // the reported failure: cusparse.h (CUDAContextLight.h) lives in nvidia/cu13/include, which must be passed on
    expect(layout).toEqual({
      cuda: true,
      wheels: 'cu13',
      nccl: { enabled: true, includeDirs: [path.join(site, 'nvidia/nccl/include'), path.join(site, 'nvidia/cu13/include')], missing: [] },
    });
    expect(lt.cmakeVariables({ dir, abi: 'cxx11', layout })).toEqual({
      TORCH_DIR: dir,
      TORCH_CXX11_ABI: '1',
      TL_NCCL: 'ON',
      TL_NCCL_INCLUDE_DIRS: `${path.join(site, 'nvidia/nccl/include')};${path.join(site, 'nvidia/cu13/include')}`,
    });
    expect(lt.ncclSummary(layout, dir)).toMatch(/^NCCL: yes \(CUDA headers from .*nvidia\/nccl\/include, .*nvidia\/cu13\/include\)$/);
  });

  test('cu13 wheels as torch installs them (no crt/, no nv/): NCCL off, gloo, and what to install', () => {
    const site = fresh('cu13-plain');
    const dir = fakeTorch(path.join(site, 'torch'), { cuda: true });
    cu13Wheels(site, { crt: false, cccl: false });
    const layout = lt.cudaLayout(dir, { platform: 'linux', ...hermetic });
    expect(layout.cuda).toBe(true);
    expect(layout.wheels).toBe('cu13');
    expect(layout.nccl).toEqual({
      enabled: false,
      includeDirs: [],
      missing: [
        { header: 'crt/host_config.h', pip: 'nvidia-cuda-crt' },
        { header: 'nv/target', pip: 'nvidia-cuda-cccl' },
      ],
    });
    expect(lt.cmakeVariables({ dir, abi: 'cxx11', layout })).toEqual({
      TORCH_DIR: dir,
      TORCH_CXX11_ABI: '1',
      TL_NCCL: 'OFF',
      TL_NCCL_INCLUDE_DIRS: '',
      TL_NCCL_MISSING: 'crt/host_config.h nv/target',
    });
    expect(lt.ncclSummary(layout, dir)).toBe(
      'NCCL: no, distributed CUDA training will use gloo: crt/host_config.h, nv/target not found. ' +
        `For NCCL, install the pip package(s) nvidia-cuda-crt nvidia-cuda-cccl where torch is (${site}), then rebuild`,
    );
  });

  test('cu12 wheels: one folder per library', () => {
    const site = fresh('cu12');
    const dir = fakeTorch(path.join(site, 'torch'), { cuda: true });
    cu12Wheels(site);
    const layout = lt.cudaLayout(dir, { platform: 'linux', ...hermetic });
    const inc = (lib: string) => path.join(site, 'nvidia', lib, 'include');
    expect(layout).toEqual({
      cuda: true,
      wheels: 'cu12',
      nccl: {
        enabled: true,
        includeDirs: [inc('nccl'), inc('cuda_runtime'), inc('cuda_nvcc'), inc('cuda_cccl'), inc('cublas'), inc('cusparse'), inc('cusolver')],
        missing: [],
      },
    });

    const noNccl = fresh('cu12-no-nccl');
    const dir2 = fakeTorch(path.join(noNccl, 'torch'), { cuda: true });
    cu12Wheels(noNccl, { nccl: false });
    const off = lt.cudaLayout(dir2, { platform: 'linux', ...hermetic });
    expect(off.nccl).toEqual({ enabled: false, includeDirs: [], missing: [{ header: 'nccl.h', pip: 'nvidia-nccl-cu12' }] });
  });

  test('a CUDA libtorch zip takes the headers from CUDA_HOME (CCCL in include/cccl) and NCCL_INCLUDE_DIR', () => {
    const dir = fakeTorch(fresh('libtorch-cuda'), { cuda: true });
    const cudaHome = fresh('cuda-13.0');
    for (const h of ['cuda_runtime_api.h', 'crt/host_config.h', 'cccl/nv/target', 'cublas_v2.h', 'cublasLt.h', 'cusparse.h', 'cusolverDn.h']) {
      touch(path.join(cudaHome, 'include', h));
    }
    const without = lt.cudaLayout(dir, { platform: 'linux', env: { CUDA_HOME: cudaHome }, systemDirs: [] });
    expect(without.wheels).toBeNull();
    expect(without.nccl.missing).toEqual([{ header: 'nccl.h', pip: 'nvidia-nccl-cu13 / nvidia-nccl-cu12' }]);
    expect(lt.ncclSummary(without, dir)).toMatch(/nccl\.h not found\. For NCCL, install a CUDA toolkit and NCCL .* set CUDA_HOME \(and NCCL_INCLUDE_DIR\)/);

    const ncclDir = fresh('nccl');
    touch(path.join(ncclDir, 'nccl.h'));
    const env = { CUDA_HOME: cudaHome, NCCL_INCLUDE_DIR: ncclDir };
    expect(lt.cudaLayout(dir, { platform: 'linux', env, systemDirs: [] }).nccl).toEqual({
      enabled: true,
      includeDirs: [ncclDir, path.join(cudaHome, 'include'), path.join(cudaHome, 'include/cccl')],
      missing: [],
    });
    // the same headers found in a system folder
    expect(lt.cudaLayout(dir, { platform: 'linux', env: { NCCL_INCLUDE_DIR: ncclDir }, systemDirs: [path.join(cudaHome, 'include')] }).nccl.enabled).toBe(true);
  });

  test('every header NCCL needs is checked: removing any one turns NCCL off', () => {
    for (const { header } of lt.NCCL_HEADERS) {
      const site = fresh(`cu13-minus-${header.replace(/\W/g, '_')}`);
      const dir = fakeTorch(path.join(site, 'torch'), { cuda: true });
      cu13Wheels(site);
      for (const d of ['nvidia/cu13/include', 'nvidia/cu13/include/cccl', 'nvidia/nccl/include']) fs.rmSync(path.join(site, d, header), { force: true });
      const layout = lt.cudaLayout(dir, { platform: 'linux', ...hermetic });
      expect({ header, enabled: layout.nccl.enabled, missing: layout.nccl.missing.map((m) => m.header) }).toEqual({ header, enabled: false, missing: [header] });
    }
  });

  test('macOS: no CXX11 ABI define and no CUDA', () => {
    const dir = fakeTorch(fresh('mac'), { platform: 'darwin' });
    const layout = lt.cudaLayout(dir, { platform: 'darwin', ...hermetic });
    expect(layout.cuda).toBe(false);
    expect(lt.cmakeVariables({ dir, abi: lt.cxxAbi(dir, 'darwin'), layout })).toEqual({ TORCH_DIR: dir });
    expect(lt.cmakeVariables({ dir, abi: 'pre-cxx11', layout }).TORCH_CXX11_ABI).toBe('0');
  });
});

describe('tools', () => {
  test('CMake missing, unreadable or older than 3.18', () => {
    expect(lt.cmakeProblem(null)).toMatch(/^CMake was not found on PATH: install CMake 3\.18 or newer \(Debian\/Ubuntu: apt-get install cmake; macOS: brew install cmake/);
    expect(lt.cmakeProblem('cmake version 3.16.3\n\nCMake suite maintained and supported by Kitware')).toMatch(/^CMake 3\.16 is too old: install CMake 3\.18 or newer/);
    expect(lt.cmakeProblem('cmake version 2.8.12.2')).toMatch(/^CMake 2\.8 is too old/);
    expect(lt.cmakeProblem('something else')).toMatch(/^could not read the CMake version/);
    expect(lt.cmakeProblem('cmake version 3.18.0')).toBeNull();
    expect(lt.cmakeProblem('cmake version 4.1.2\n')).toBeNull();
  });

  test('C++ compilers', () => {
    expect(lt.compilerCheck('g++ (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022', 'linux')).toEqual({ kind: 'gcc', major: 12, problem: null, warning: null });
    expect(lt.compilerCheck('c++ (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)', 'linux')).toMatchObject({ kind: 'gcc', major: 11, warning: null });
    expect(lt.compilerCheck('g++ (Ubuntu 9.4.0-1ubuntu1~20.04.2) 9.4.0', 'linux').warning).toMatch(/tested with g\+\+ 11\+ and clang 14\+/);
    expect(lt.compilerCheck('Debian clang version 14.0.6', 'linux')).toMatchObject({ kind: 'clang', major: 14, problem: null, warning: null });
    expect(lt.compilerCheck('Apple clang version 15.0.0 (clang-1500.3.9.4)\nTarget: arm64-apple-darwin23.4.0', 'darwin')).toMatchObject({ kind: 'apple-clang', major: 15, problem: null });
    expect(lt.compilerCheck('g++-13 (Homebrew GCC 13.2.0) 13.2.0', 'darwin').problem).toMatch(
      /^the C\+\+ compiler is GCC .*, but libtorch on macOS is built with clang and libc\+\+: unset CXX or set CXX=clang\+\+$/,
    );
    expect(lt.noCompilerMessage(['c++', 'g++', 'clang++'], 'linux')).toBe(
      'no C++ compiler found (tried c++, g++, clang++): install one (Debian/Ubuntu: sudo apt-get install g++; Fedora: sudo dnf install gcc-c++) or set CXX to its path',
    );
    expect(lt.noCompilerMessage(['c++'], 'darwin')).toMatch(/xcode-select --install/);
  });
});

describe('addon load failures', () => {
  test('a CUDA library missing at run time', () => {
    const msg = 'libcusparse.so.12: cannot open shared object file: No such file or directory';
    const hint = lt.explainLoadFailure(msg);
    expect(hint).toMatch(/^The addon was built against a CUDA build of libtorch, and the CUDA library libcusparse\.so\.12 it needs was not found\./);
    expect(hint).toMatch(/install nvidia-cusparse \(CUDA 13 torch\) or nvidia-cusparse-cu12 \(CUDA 12 torch\)/);
    expect(hint).toMatch(/without LD_LIBRARY_PATH/);
    expect(lt.explainLoadFailure('Error: libcudnn_graph.so.9: cannot open shared object file')).toMatch(/libcudnn_graph\.so\.9 .* nvidia-cudnn-cu13/);
    expect(lt.explainLoadFailure('libcusparseLt.so.0: cannot open shared object file')).toMatch(/nvidia-cusparselt-cu13/);
    // src/native.ts gives the same explanation
    expect(loadFailureHint(msg)).toBe(hint);
  });

  test('libtorch moved, ABI mismatch, unknown library, no build', () => {
    expect(lt.explainLoadFailure('dlopen(x.node): Library not loaded: @rpath/libtorch_cpu.dylib\n  Referenced from: ...')).toMatch(
      /^The addon cannot find libtorch_cpu\.dylib: the libtorch it was built against has moved or was removed\. Rebuild/,
    );
    expect(lt.explainLoadFailure('/x/train_lora.node: undefined symbol: _ZN3c106detail14torchCheckFailEPKcS2_jRKSs')).toMatch(
      /^The addon and the libtorch it loaded disagree \(undefined symbol _ZN3c106detail14torchCheckFailEPKcS2_jRKSs\): .* C\+\+ ABI/,
    );
    expect(lt.explainLoadFailure('libpng16.so.16: cannot open shared object file')).toMatch(/^The addon needs libpng16\.so\.16/);
    expect(lt.explainLoadFailure('something else')).toBeNull();
    expect(loadFailureHint('No native build was found for platform=linux')).toMatch(/^The native addon is not built\. Run `npm run build:native`/);
    expect(loadFailureHint('something else')).toMatch(/^Rebuild the addon with `npm run build:native`/);
  });

  test('TRAIN_LORA_ADDON names the addon file to load', () => {
    const saved = process.env.TRAIN_LORA_ADDON;
    try {
      const missing = path.join(tmp, 'nowhere', 'train_lora.node');
      process.env.TRAIN_LORA_ADDON = missing;
      expect(() => native()).toThrow(`train-lora: TRAIN_LORA_ADDON=${missing} does not exist`);
      const broken = path.join(fresh('addon'), 'train_lora.node');
      touch(broken, 'not a shared library');
      process.env.TRAIN_LORA_ADDON = broken;
      expect(() => native()).toThrow(`train-lora: cannot load the native addon (TRAIN_LORA_ADDON=${broken}): `);
    } finally {
      if (saved === undefined) delete process.env.TRAIN_LORA_ADDON;
      else process.env.TRAIN_LORA_ADDON = saved;
    }
  });
});
