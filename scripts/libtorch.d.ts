// Types of scripts/libtorch.js (plain CommonJS, so that build-native.js runs before TypeScript is compiled).
export type Platform = 'linux' | 'darwin' | NodeJS.Platform;
export interface TorchVersion {
  major: number;
  minor: number;
  patch: number;
}
export type CxxAbi = 'cxx11' | 'pre-cxx11' | 'libc++';
export interface NcclHeader {
  header: string;
  pip: { cu13: string; cu12: string };
}
export interface CudaLayout {
  cuda: boolean;
  wheels: 'cu13' | 'cu12' | null;
  nccl: { enabled: boolean; includeDirs: string[]; missing: Array<{ header: string; pip: string }> };
}
export type Env = Record<string, string | undefined>;

export const MIN_TORCH: { major: number; minor: number };
export const MIN_CMAKE: [number, number];
export const NCCL_HEADERS: NcclHeader[];
export const SYSTEM_CUDA_INCLUDE_DIRS: string[];

export function libFile(name: string, platform: Platform): string;
export function torchDirProblem(dir: string, platform: Platform): string | null;
export function resolveTorchDir(p: string, platform: Platform): { dir: string; problem?: undefined } | { dir?: undefined; problem: string };
export function torchVersion(dir: string): TorchVersion | null;
export function torchProblems(dir: string): string[];
export function cxxAbi(dir: string, platform: Platform): CxxAbi | null;
export function libraryArch(file: string): string | null;
export function binaryProblem(dir: string, platform: Platform, arch: string): string | null;
export function cudaWheelLayout(torchDir: string): 'cu13' | 'cu12' | null;
export function cudaLayout(torchDir: string, options: { platform: Platform; env?: Env; systemDirs?: string[] }): CudaLayout;
export function ncclSummary(layout: CudaLayout, torchDir: string): string;
export function cmakeVariables(o: { dir: string; abi: CxxAbi | null; layout: CudaLayout }): Record<string, string>;
export function findLibtorch(o: {
  env: Env;
  platform: Platform;
  pythonName?: string;
  pythonTorch: () => string | null;
  installLocal: () => string | null;
}): { dir: string; source: string; skipped: string[] };
export function cmakeProblem(output: string | null): string | null;
export function compilerCheck(
  output: string,
  platform: Platform,
): { kind: 'gcc' | 'clang' | 'apple-clang' | 'unknown'; major: number | null; problem: string | null; warning: string | null };
export function noCompilerMessage(tried: string[], platform: Platform): string;
export function explainLoadFailure(message: string): string | null;
