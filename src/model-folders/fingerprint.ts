/**
 * A cheap, stable fingerprint of a model folder: sha256 over each component's config.json, the safetensors
 * headers, and 16 evenly spaced 64 KiB samples of the weight bytes (for a single-file checkpoint: its header and
 * samples of its bytes). It changes when the architecture, the dtype
 * layout or the weights change, and costs milliseconds even for a 4 GB UNet.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

const COMPONENTS = ['unet', 'vae', 'text_encoder'];
const SAMPLES = 16;
const SAMPLE_BYTES = 64 * 1024;

function hashFileSamples(h: crypto.Hash, file: string): void {
  const size = fs.statSync(file).size;
  h.update(`${path.basename(file)}:${size}\n`);
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(SAMPLE_BYTES);
    // The header (its length prefix and JSON) in full, then samples of the data.
    const lenBuf = Buffer.alloc(8);
    fs.readSync(fd, lenBuf, 0, 8, 0);
    const headerLen = Math.min(Number(lenBuf.readBigUInt64LE()), size - 8);
    const header = Buffer.allocUnsafe(Math.max(0, headerLen));
    fs.readSync(fd, header, 0, header.length, 8);
    h.update(header);
    for (let i = 0; i < SAMPLES; i++) {
      const pos = Math.floor(((size - SAMPLE_BYTES) * i) / (SAMPLES - 1));
      const n = fs.readSync(fd, buf, 0, SAMPLE_BYTES, Math.max(0, pos));
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
}

export async function modelFingerprint(dir: string): Promise<string> {
  const h = crypto.createHash('sha256');
  // A single-file checkpoint: its header (names, dtypes, shapes) and samples of its bytes, as for a component's file.
  if (fs.existsSync(dir) && fs.statSync(dir).isFile()) {
    h.update('[single-file]\n');
    hashFileSamples(h, dir);
    return h.digest('hex').slice(0, 16);
  }
  for (const c of COMPONENTS) {
    const cdir = path.join(dir, c);
    if (!fs.existsSync(cdir)) continue;
    h.update(`[${c}]\n`);
    const cfg = path.join(cdir, 'config.json');
    if (fs.existsSync(cfg)) h.update(fs.readFileSync(cfg));
    for (const f of fs.readdirSync(cdir).filter((n) => n.endsWith('.safetensors')).sort()) hashFileSamples(h, path.join(cdir, f));
  }
  return h.digest('hex').slice(0, 16);
}
