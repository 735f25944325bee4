/** Host-side helpers for {@link HostTensor}s: typed views, construction and comparison. */
import type { DType, HostTensor } from './native';

export const DTYPE_SIZE: Record<DType, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1 };

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** A copy of the bytes in a fresh, aligned ArrayBuffer. */
function aligned(data: Uint8Array): ArrayBuffer {
  const buf = new ArrayBuffer(data.byteLength);
  new Uint8Array(buf).set(data);
  return buf;
}

function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * 2 ** -14 * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * 2 ** (e - 15) * (1 + f / 1024);
}

/** Values as float64 numbers (any dtype; int64 beyond 2^53 loses precision). */
export function toNumbers(t: HostTensor): Float64Array {
  const n = numel(t.shape);
  const buf = aligned(t.data);
  const out = new Float64Array(n);
  switch (t.dtype) {
    case 'F64': out.set(new Float64Array(buf)); break;
    case 'F32': out.set(new Float32Array(buf)); break;
    case 'I32': out.set(new Int32Array(buf)); break;
    case 'I16': out.set(new Int16Array(buf)); break;
    case 'I8': out.set(new Int8Array(buf)); break;
    case 'U8': case 'BOOL': out.set(new Uint8Array(buf)); break;
    case 'I64': { const v = new BigInt64Array(buf); for (let i = 0; i < n; i++) out[i] = Number(v[i]); break; }
    case 'F16': { const v = new Uint16Array(buf); for (let i = 0; i < n; i++) out[i] = halfToFloat(v[i]); break; }
    case 'BF16': {
      const v = new Uint16Array(buf);
      const f = new Float32Array(1);
      const u = new Uint32Array(f.buffer);
      for (let i = 0; i < n; i++) { u[0] = v[i] << 16; out[i] = f[0]; }
      break;
    }
  }
  return out;
}

export function fromFloat32(name: string, shape: number[], values: ArrayLike<number>): HostTensor {
  const arr = Float32Array.from(values);
  if (arr.length !== numel(shape)) throw new Error(`${name}: ${arr.length} values for shape [${shape.join(', ')}]`);
  return { name, dtype: 'F32', shape, data: new Uint8Array(arr.buffer) };
}

export function fromInt64(name: string, shape: number[], values: ArrayLike<number>): HostTensor {
  const arr = BigInt64Array.from(Array.from(values, (v) => BigInt(v)));
  if (arr.length !== numel(shape)) throw new Error(`${name}: ${arr.length} values for shape [${shape.join(', ')}]`);
  return { name, dtype: 'I64', shape, data: new Uint8Array(arr.buffer) };
}

/** ‖a − b‖ / ‖b‖ over two equally long arrays (‖a − b‖ when b is all zero). */
export function relativeErrorOf(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`relative error of arrays of ${a.length} and ${b.length} values`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

/** ‖a − b‖ / ‖b‖ of two tensors of the same shape (0 when both are zero). */
export function relativeError(a: HostTensor, b: HostTensor): number {
  if (a.shape.join(',') !== b.shape.join(',')) throw new Error(`${a.name}: shape [${a.shape}] vs [${b.shape}]`);
  return relativeErrorOf(toNumbers(a), toNumbers(b));
}

export function byName(tensors: HostTensor[]): Map<string, HostTensor> {
  return new Map(tensors.map((t) => [t.name, t]));
}
