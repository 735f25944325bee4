/**
 * pino logger factory: human-readable colored lines on a terminal, JSON lines otherwise, and a
 * JSON log file on the side. Every destination is synchronous (a crash loses no line), and the
 * pretty console output goes through the shared `Terminal` so it never garbles a progress bar.
 */

import * as fs from 'node:fs';
import * as path from 'node:path';

import pino from 'pino';
import { prettyFactory } from 'pino-pretty';

import { defaultTerminal, Terminal, TermStream } from './progress';

export type Logger = pino.Logger;
export type LogLevel = pino.LevelWithSilent;
/** auto: pretty when stdout is a TTY, JSON lines otherwise. */
export type ConsoleMode = 'auto' | 'pretty' | 'json' | 'silent';

export interface LoggerOptions {
  /** Console level (default "info"). */
  level?: LogLevel;
  /** JSON log file (appended, parent directories created); null/undefined = none. */
  file?: string | null;
  /** File level (default: "debug", or `level` when that is more verbose). */
  fileLevel?: LogLevel;
  console?: ConsoleMode;
  /** Console stream (default process.stdout). */
  stdout?: TermStream;
  terminal?: Terminal;
  /** Colors in pretty mode (default: on unless NO_COLOR is set). */
  colorize?: boolean;
  /** Bindings on every line instead of pino's default { pid, hostname }. */
  base?: Record<string, unknown>;
}

export interface LoggerHandle {
  logger: Logger;
  /** The log file, if any. */
  file: string | null;
  /** Flushes and closes the file (fsync'd). The logger must not be used afterwards. */
  close(): void;
}

/** OUT/logs/train.log */
export function defaultLogFile(outDir: string): string {
  return path.join(outDir, 'logs', 'train.log');
}

function moreVerbose(a: LogLevel, b: LogLevel): LogLevel {
  return pino.levels.values[a] <= pino.levels.values[b] ? a : b;
}

function levelValue(l: LogLevel): number {
  return l === 'silent' ? Infinity : pino.levels.values[l];
}

export function createLogger(o: LoggerOptions = {}): LoggerHandle {
  const level = o.level ?? 'info';
  const stdout = o.stdout ?? process.stdout;
  const terminal = o.terminal ?? defaultTerminal();
  let mode = o.console ?? 'auto';
  if (mode === 'auto') mode = stdout.isTTY ? 'pretty' : 'json';

  const streams: pino.StreamEntry[] = [];
  if (mode === 'pretty' && level !== 'silent') {
    const pretty = prettyFactory({
      colorize: o.colorize ?? !process.env.NO_COLOR,
      translateTime: 'SYS:HH:MM:ss',
      ignore: 'pid,hostname',
      // On a terminal the message says it all; the structured fields stay in the JSON log file and piped output.
      hideObject: true,
      singleLine: true,
    });
    // pino calls write() synchronously with one JSON line; prettify and hand it to the terminal.
    streams.push({
      level,
      stream: {
        write: (line: string) => {
          const text = pretty(line);
          terminal.write(stdout, text.endsWith('\n') ? text : `${text}\n`);
        },
      },
    });
  } else if (mode === 'json' && level !== 'silent') {
    const dest = o.stdout ? { write: (line: string) => void stdout.write(line) } : pino.destination({ dest: 1, sync: true });
    streams.push({ level, stream: dest });
  }

  let fileDest: ReturnType<typeof pino.destination> | null = null;
  const file = o.file ?? null;
  if (file !== null) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fileDest = pino.destination({ dest: file, sync: true, append: true, mkdir: true });
    const fileLevel = o.fileLevel ?? (level === 'silent' ? 'debug' : moreVerbose(level, 'debug'));
    if (fileLevel !== 'silent') streams.push({ level: fileLevel, stream: fileDest });
  }

  // The logger's own level must let through the most verbose stream's lines.
  const minLevel = streams.reduce<LogLevel>((m, s) => (levelValue(s.level as LogLevel) < levelValue(m) ? (s.level as LogLevel) : m), 'silent');
  const logger = pino(
    { level: minLevel, ...(o.base ? { base: o.base } : {}), timestamp: pino.stdTimeFunctions.isoTime },
    pino.multistream(streams),
  );
  let closed = false;
  return {
    logger,
    file,
    close(): void {
      if (closed) return;
      closed = true;
      if (fileDest) {
        fileDest.flushSync();
        const fd = (fileDest as unknown as { fd: number }).fd;
        if (typeof fd === 'number' && fd >= 0) {
          try {
            fs.fsyncSync(fd);
          } catch {
            // fsync can fail on exotic filesystems; the data was already written synchronously.
          }
        }
        fileDest.end();
      }
    },
  };
}
