/**
 * train-lora's programmatic API. The CLI (`train-lora`) is built on exactly these pieces.
 */
export { native } from './native';
export type {
  DeviceInfo,
  DType,
  ForwardOptions,
  HostTensor,
  LoadPipelineOptions,
  LoraFileFormat,
  LoraSource,
  LoraSummary,
  NativeBinding,
  PipelineHandle,
  Precision,
  ProcessGroupHandle,
  TrainerHandle,
  TrainerOptions,
  SamplerHandle,
  SamplerCreateOptions,
  SamplerStepProgram,
} from './native';
export { CheckpointManager, CheckpointError, RunLock, markKeep, verifyCheckpoint } from './checkpoint/manager';
export type { BestRecord, CheckpointEntry, Manifest, SaveOptions } from './checkpoint/manager';
export { TrainConfigSchema, parseTrainConfig, readConfigFile, ConfigError } from './config';
export type { TrainConfig, TrainConfigInput } from './config';
export { train } from './train/train';
export { nextRunDir } from './train/resume';
export type { StepMetrics, TrainReporter, TrainResult, TrainerStateFile } from './train/train';
export { distEnvFromProcess, launchPlan } from './distributed/env';
export type { DistEnv, LaunchPlan } from './distributed/env';
export { superviseWorkers } from './distributed/launcher';
export { exportLora, exportCheckpoint, ExportError, LORA_FILES, MERGED_PIPELINE_DIR } from './export/lora-export';
export type { ExportSpec, ExportResult, CheckpointExportOptions } from './export/lora-export';
export { CLIPTokenizer } from './tokenizer';
export { loadDataset, datasetFingerprint } from './data/dataset';
export { makeDemoData } from './data/demo-data';
export { makeTinyModel, checkModelFolder } from './model-folders/model-folder';
export { NoiseSchedule } from './schedules/noise';
export { makeSchedule, SCHEDULER_NAMES } from './inference/schedulers';
export type { SamplingSchedule, SchedulerName, SchedulerStep, SamplerOp, SchedulerOverrides } from './inference/schedulers';
export { textToImage, writePng, makeGrid, pngBuffer, toRgbBytes } from './inference/text-to-image';
export type { TextToImageOptions, GeneratedImage, RgbImage } from './inference/text-to-image';
export { runGenerateCommand } from './commands/generate';
export type { GenerateArgs } from './commands/generate';
export { createLrSchedule, lrAt } from './schedules/lr';
/** Resolves with the devices libtorch can use (cpu, cuda with name and memory, mps with the reason it is missing). */
export function devices(): ReturnType<import('./native').NativeBinding['devices']> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return (require('./native') as typeof import('./native')).native().devices();
}
