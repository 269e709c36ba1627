// Dtypes and shapes shared by every layer; host-side conversions between storage formats.

export type DType = "f32" | "bf16" | "f16" | "i32";
export type Shape = readonly number[];

export function numel(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function bytesPerElement(dtype: DType): number {
  switch (dtype) {
    case "f32":
    case "i32":
      return 4;
    case "bf16":
    case "f16":
      return 2;
    default:
      return dtype satisfies never;
  }
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function bf16ToF32(bits: Uint16Array, out = new Float32Array(bits.length)): Float32Array {
  const o32 = new Uint32Array(out.buffer, out.byteOffset, out.length);
  for (let i = 0; i < bits.length; i++) o32[i] = bits[i]! << 16;
  return out;
}

/** Round-to-nearest-even f32 -> bf16 bits (NaN stays NaN). */
export function f32ToBf16(x: Float32Array, out = new Uint16Array(x.length)): Uint16Array {
  for (let i = 0; i < x.length; i++) {
    f32[0] = x[i]!;
    const u = u32[0]!;
    if ((u & 0x7fffffff) > 0x7f800000) {
      out[i] = (u >>> 16) | 0x40;
      continue;
    }
    out[i] = (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
  }
  return out;
}

export function f16ToF32(bits: Uint16Array, out = new Float32Array(bits.length)): Float32Array {
  for (let i = 0; i < bits.length; i++) {
    const h = bits[i]!;
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) out[i] = sign * frac * 2 ** -24;
    else if (exp === 31) out[i] = frac ? NaN : sign * Infinity;
    else out[i] = sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  return out;
}

/** Round-to-nearest-even f32 -> f16 bits. */
export function f32ToF16(x: Float32Array, out = new Uint16Array(x.length)): Uint16Array {
  for (let i = 0; i < x.length; i++) {
    f32[0] = x[i]!;
    const u = u32[0]!;
    const sign = (u >>> 16) & 0x8000;
    const exp = (u >>> 23) & 0xff;
    let mant = u & 0x7fffff;
    if (exp === 0xff) {
      out[i] = sign | 0x7c00 | (mant ? 0x200 : 0);
      continue;
    }
    let e = exp - 127 + 15;
    if (e >= 31) {
      out[i] = sign | 0x7c00;
      continue;
    }
    if (e <= 0) {
      if (e < -10) {
        out[i] = sign;
        continue;
      }
      mant |= 0x800000;
      const shift = 14 - e;
      let h = mant >>> shift;
      const rem = mant & ((1 << shift) - 1);
      const half = 1 << (shift - 1);
      if (rem > half || (rem === half && (h & 1))) h++;
      out[i] = sign | h;
      continue;
    }
    let h = (e << 10) | (mant >>> 13);
    const rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem === 0x1000 && (h & 1))) h++;
    out[i] = sign | h;
  }
  return out;
}

/** Any float host tensor as f32 (copies unless already f32). */
export function toF32(data: Float32Array | Uint16Array | Int32Array, dtype: DType): Float32Array {
  switch (dtype) {
    case "f32":
      return data as Float32Array;
    case "bf16":
      return bf16ToF32(data as Uint16Array);
    case "f16":
      return f16ToF32(data as Uint16Array);
    case "i32":
      return Float32Array.from(data as Int32Array);
    default:
      return dtype satisfies never;
  }
}

/** Validated output splits of a LoRA stack (shared by the backends). */
export function loraOutDims(outDims: number | readonly number[]): readonly number[] {
  const dims = typeof outDims === "number" ? [outDims] : [...outDims];
  if (dims.length === 0 || dims.some((d) => !Number.isInteger(d) || d <= 0)) {
    throw new Error(`LoRA stack output splits must be positive integers (got [${dims.join(", ")}])`);
  }
  return dims;
}
