import * as fs from 'node:fs';

/**
 * A safetensors file with a real header (these names, shapes and dtype) whose data are holes: the file has its full
 * size but takes no disk, and reads as zeros. Real SD 1.5 layouts load this way in a test without their gigabytes.
 */
export function writeSparseSafetensors(file: string, shapes: Record<string, number[]>, dtype: 'F32' | 'F16' = 'F32'): void {
  const size = dtype === 'F32' ? 4 : 2;
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const [k, shape] of Object.entries(shapes)) {
    const bytes = shape.reduce((a, b) => a * b, 1) * size;
    header[k] = { dtype, shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  fs.writeFileSync(file, Buffer.concat([len, Buffer.from(json)]));
  fs.truncateSync(file, 8 + Buffer.byteLength(json) + offset);
}
