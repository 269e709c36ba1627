// The CUDA GPTQ solver (gpu_gptq.ts cudaGptqSolver): gptqQuantize's steps on the GPU, in
// float64 like the CPU reference.
//
//   host      gptqPlan: dead inputs, solving order, mean diagonal, groups (gpu_gptq_plan.ts)
//   upload    H (f32 [K, K]) and w (f32 [N, K]) as given
//   factor    per damping of gptq.ts's schedule: A = J (P H P^T + lambda I) J (f64,
//             gptq_damped_hessian), cuSOLVER dpotrf; the first whose factor is positive
//             definite wins (info == 0 and a finite positive diagonal). Then dtrtri in place
//             and gptq_reverse_upper: U = chol(H^-1) upper, as linalg.ts choleskyInverseUpper.
//   solve     W = w^T in solving order (f64); per block of B columns, gptq_block (column
//             loop, codes, scales/zeros of dynamic groups, scaled errors E) then one DGEMM
//             W[i2:] -= U[i1:i2, i2:]^T E (linalg.ts lazyBlockUpdate).
//   download  codes, scales, zeros, per-CTA losses (summed here in a fixed order).
//
// What differs from the CPU: the Cholesky, the triangular inverse and the lazy update sum in
// cuSOLVER's / cuBLAS's order, not the CPU's, so U and W differ by a few ulps; a code differs
// only where a value lies within that distance of a rounding boundary (test/gpu/gptq.test.ts
// counts them), and the damping can differ only for an H whose Cholesky succeeds or fails
// within rounding. Results are deterministic run to run (cuBLAS/cuSOLVER on one GPU model, no
// atomics in the sums).
//
// Why f64 and not f32: on an H100 the f64 work is not what a solve waits for. bench/gptq_solve.ts
// (4 bits, groups of 128, act-order; wall time of solve() from host arrays to host results):
//   K x N          wall    upload  factor  column loop + DGEMMs  download
//   4096 x 4096    52 ms   15 ms   13 ms    9 ms                 12 ms
//   11008 x 4096  260 ms   87 ms  101 ms   35 ms                 31 ms
//   4096 x 11008   90 ms   29 ms   13 ms   14 ms                 30 ms
// so a Llama-2-7B (32 x (4 + 2 + 1) solves) takes about 21 s, and f32 could save at most the
// "column loop" share while giving up bit-identical codes (the GPU test measured none
// differing from the CPU's).
//
// Device memory is kept between solves and grown to the largest shape seen: at Llama-2-7B's
// shapes 2.05 GB (H f32 0.48 GB, A/U f64 0.97 GB, w f32 0.18 GB, W f64 0.36 GB, codes 0.05 GB,
// cuSOLVER workspace); the device's free memory dropped by 2.06 GB in the benchmark, cuBLAS and
// cuSOLVER included. dispose() frees it.

import type { CudaBackend } from "../backend/cuda/cuda_backend.js";
import { quietly } from "../backend/cuda/ffi/errors.js";
import { Cublas, CUBLAS_OP_N, CUBLAS_OP_T } from "../backend/cuda/ffi/cublas.js";
import { CUBLAS_FILL_MODE_LOWER, CusolverDn } from "../backend/cuda/ffi/cusolver.js";
import {
  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
  CU_EVENT_DEFAULT, CU_STREAM_NON_BLOCKING, cudaDriver, type CudaDriver,
} from "../backend/cuda/ffi/driver.js";
import { buildKernels } from "../backend/cuda/ffi/nvrtc.js";
import { GPTQ_LANES, GPTQ_MAX_BLOCK, GptqOps } from "../backend/cuda/gptq_ops.js";
import { KernelLauncher } from "../backend/cuda/launcher.js";
import { KERNEL_FILES } from "../backend/cuda/ops.js";
import { dampSchedule, GptqError, type GptqOptions, type GptqResult } from "./gptq.js";
import type { GptqSolver } from "./gpu_gptq.js";
import { gptqPlan } from "./gpu_gptq_plan.js";
import { F16_MAX } from "./quantizer.js";
import type { QuantSpec } from "./types.js";

/** Device milliseconds of each phase of the last solve (events on the solver's stream). */
export interface GptqSolveProfile {
  readonly uploadMs: number;
  readonly factorMs: number;
  readonly solveMs: number;
  readonly downloadMs: number;
  /** Host wall time of the whole solve() call. */
  readonly wallMs: number;
  /** Device bytes the solver holds after the solve. */
  readonly deviceBytes: number;
}

interface Buffer {
  ptr: bigint;
  bytes: number;
}

export class CudaGptqSolver implements GptqSolver {
  readonly #d: CudaDriver;
  readonly #ordinal: number;
  readonly #ctx: bigint;
  readonly #stream: bigint;
  readonly #launcher: KernelLauncher;
  readonly #ops: GptqOps;
  readonly #solver: CusolverDn;
  readonly #blas: Cublas;
  readonly #events: bigint[];
  readonly #buffers = new Map<string, Buffer>();
  #disposed = false;
  /** Phases of the last solve (bench/gptq_solve.ts). */
  lastProfile: GptqSolveProfile | null = null;

  private constructor(init: { d: CudaDriver; ordinal: number; ctx: bigint; stream: bigint; launcher: KernelLauncher; solver: CusolverDn; blas: Cublas; events: bigint[] }) {
    this.#d = init.d;
    this.#ordinal = init.ordinal;
    this.#ctx = init.ctx;
    this.#stream = init.stream;
    this.#launcher = init.launcher;
    this.#ops = new GptqOps(init.launcher);
    this.#solver = init.solver;
    this.#blas = init.blas;
    this.#events = init.events;
  }

  /**
   * A solver on `backend`'s device (its primary context, so device pointers are shared) with
   * its own stream, kernels, cuSOLVER and cuBLAS handles; without a backend, on device
   * INLAID_CUDA_DEVICE (default 0).
   */
  static async create(backend?: CudaBackend): Promise<CudaGptqSolver> {
    const d = cudaDriver();
    const ordinal = backend?.device.ordinal ?? Number(process.env.INLAID_CUDA_DEVICE ?? 0);
    const count = d.deviceCount();
    if (!Number.isInteger(ordinal) || ordinal < 0 || ordinal >= count) {
      throw new Error(`CUDA device ${ordinal} does not exist (this machine has ${count}: 0..${count - 1})`);
    }
    const dev = d.device(ordinal);
    const undo: (() => void)[] = [];
    try {
      const ctx = d.primaryCtxRetain(dev);
      undo.push(() => d.primaryCtxRelease(dev));
      d.ctxSetCurrent(ctx);
      const arch = backend?.device.arch ?? process.env.INLAID_CUDA_ARCH
        ?? `sm_${d.deviceAttribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)}${d.deviceAttribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)}`;
      const file = KERNEL_FILES.find((f) => f.endsWith("/gptq.cu"));
      if (!file) throw new Error("kernels/gptq.cu is not among ops.ts's KERNEL_FILES; the GPTQ solver needs it");
      const stream = d.streamCreate(CU_STREAM_NON_BLOCKING);
      undo.push(() => d.streamDestroy(stream));
      const images = await buildKernels({ files: [file], arch });
      d.ctxSetCurrent(ctx);
      const launcher = new KernelLauncher(d, stream, images, d.deviceAttribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev));
      undo.push(() => launcher.dispose());
      const solver = CusolverDn.open(stream);
      undo.push(() => solver.dispose());
      const blas = Cublas.open(stream);
      undo.push(() => blas.dispose());
      const events: bigint[] = [];
      for (let i = 0; i < 5; i++) {
        const e = d.eventCreate(CU_EVENT_DEFAULT);
        events.push(e);
        undo.push(() => d.eventDestroy(e));
      }
      return new CudaGptqSolver({ d, ordinal, ctx, stream, launcher, solver, blas, events });
    } catch (e) {
      for (const f of undo.reverse()) {
        try {
          f();
        } catch {
          // unwinding a failed creation
        }
      }
      throw e;
    }
  }

  /** A device buffer of at least `bytes`, kept between solves (grown, never shrunk). */
  #buf(name: string, bytes: number): bigint {
    const b = this.#buffers.get(name);
    if (b && b.bytes >= bytes) return b.ptr;
    if (b) {
      this.#d.streamSynchronize(this.#stream);
      this.#d.memFree(b.ptr);
      this.#buffers.delete(name);
    }
    let ptr: bigint;
    try {
      ptr = this.#d.memAlloc(bytes);
    } catch (e) {
      const m = this.#d.memGetInfo();
      if (e instanceof Error) e.message += ` (GPTQ solver buffer '${name}'; device memory: ${(m.free / 2 ** 20).toFixed(0)} MiB free of ${(m.total / 2 ** 20).toFixed(0)} MiB)`;
      throw e;
    }
    this.#buffers.set(name, { ptr, bytes });
    return ptr;
  }

  get deviceBytes(): number {
    let s = 0;
    for (const b of this.#buffers.values()) s += b.bytes;
    return s;
  }

  solve(w: Float32Array, N: number, K: number, h: Float32Array, spec: QuantSpec, opts: GptqOptions = {}): GptqResult {
    if (this.#disposed) throw new Error("the CUDA GPTQ solver has been disposed");
    if (w.length !== N * K) throw new RangeError(`weight has ${w.length} values, expected ${N} x ${K}`);
    const B = opts.blockSize ?? 128;
    if (!(Number.isInteger(B) && B >= 1 && B <= GPTQ_MAX_BLOCK)) {
      throw new RangeError(`the CUDA GPTQ solver takes blocks of 1..${GPTQ_MAX_BLOCK} columns (blockSize ${B}); use cpuGptqSolver() for larger ones`);
    }
    const t0 = performance.now();
    const plan = gptqPlan(h, K, spec, opts.staticGroups ?? false);
    const d = this.#d;
    const st = this.#stream;
    d.ctxSetCurrent(this.#ctx);
    const [e0, e1, e2, e3, e4] = this.#events as [bigint, bigint, bigint, bigint, bigint];

    const G = plan.numGroups;
    const ctas = Math.ceil(N / GPTQ_LANES);
    const nBlocks = Math.ceil(K / B);
    const hDev = this.#buf("h", K * K * 4);
    const a = this.#buf("a", K * K * 8);
    const wDev = this.#buf("w", N * K * 4);
    const W = this.#buf("W", K * N * 8);
    const E = this.#buf("E", B * N * 8);
    const codes = this.#buf("codes", K * N);
    const scales = this.#buf("scales", G * N * 4);
    const zeros = this.#buf("zeros", G * N);
    const small = this.#buf("small", K * 9 + 64); // perm i32 [K], groupOf i32 [K], dead u8 [K], then flags
    const perm = small, groupOf = small + BigInt(K * 4), dead = small + BigInt(K * 8);
    const flags = small + BigInt(Math.ceil((K * 9) / 16) * 16); // info, trtri info, bad, status (i32 each)
    const info = flags, trInfo = flags + 4n, bad = flags + 8n, status = flags + 12n;
    const loss = this.#buf("loss", nBlocks * ctas * 8);
    const potrfBytes = this.#solver.dpotrfWorkspaceBytes(CUBLAS_FILL_MODE_LOWER, K, a);
    const trtriBytes = this.#solver.dtrtriWorkspaceBytes(CUBLAS_FILL_MODE_LOWER, K, a).device;
    const workBytes = Math.max(potrfBytes, trtriBytes, 8);
    const work = this.#buf("work", workBytes);

    d.eventRecord(e0, st);
    d.memcpyHtoDAsync(hDev, h, K * K * 4, st);
    d.memcpyHtoDAsync(wDev, w, N * K * 4, st);
    d.memcpyHtoDAsync(perm, plan.perm, K * 4, st);
    d.memcpyHtoDAsync(groupOf, plan.groupOf, K * 4, st);
    d.memcpyHtoDAsync(dead, plan.dead, K, st);
    d.memsetD32Async(flags, 0, 4, st);
    d.eventRecord(e1, st);

    // Damping: the CPU's schedule, the first that factors.
    const schedule = dampSchedule(opts.percDamp ?? 0.01);
    const flagsHost = new Int32Array(4);
    let attempts = 0;
    let damp = NaN;
    for (let t = 0; t < schedule.length; t++) {
      this.#ops.dampedHessian(a, hDev, perm, K, schedule[t]! * plan.meanDiag);
      this.#solver.dpotrf(CUBLAS_FILL_MODE_LOWER, K, a, work, workBytes, info);
      this.#ops.factorOk(bad, a, K);
      d.memcpyDtoHAsync(flagsHost, flags, 16, st);
      d.streamSynchronize(st);
      if (flagsHost[0] === 0 && flagsHost[2] === 0) {
        attempts = t + 1;
        damp = schedule[t]!;
        break;
      }
      d.memsetD32Async(flags, 0, 4, st);
    }
    if (attempts === 0) {
      throw new GptqError(`the Hessian stays indefinite with damping up to ${schedule[schedule.length - 1]} x mean(diag); it is not a usable Hessian`);
    }
    this.#solver.dtrtri(CUBLAS_FILL_MODE_LOWER, K, a, work, workBytes, trInfo);
    this.#ops.reverseUpper(a, K);
    const U = a;
    d.eventRecord(e2, st);

    // Groups fixed up front come from the original weight in input order.
    if (plan.groups === "one") this.#ops.groupParams(scales, zeros, status, wDev, dead, N, K, K, spec.bits, spec.sym);
    else if (plan.groups === "static") this.#ops.groupParams(scales, zeros, status, wDev, dead, N, K, spec.groupSize, spec.bits, spec.sym);
    this.#ops.loadWeight(W, wDev, perm, dead, N, K);
    const args = {
      W, U, E, codes, scales, zeros, perm, groupOf, status, loss, K, N,
      dynamicGroupSize: plan.groups === "dynamic" ? spec.groupSize : 0, bits: spec.bits, sym: spec.sym,
    };
    for (let blk = 0; blk < nBlocks; blk++) {
      const i1 = blk * B, i2 = Math.min(i1 + B, K);
      this.#ops.block({ ...args, loss: loss + BigInt(blk * ctas * 8) }, i1, i2);
      if (i2 < K) {
        // Column-major: W^T [N, K] ld N; columns i2.. -= E^T [N, b] (ld N) x (U[i1:i2, i2:] as col-major [K-i2, b] ld K)^T.
        this.#blas.dgemm(CUBLAS_OP_N, CUBLAS_OP_T, N, K - i2, i2 - i1, -1,
          E, N, U + BigInt((i1 * K + i2) * 8), K, 1, W + BigInt(i2 * N * 8), N);
      }
    }
    d.eventRecord(e3, st);

    const codesHost = new Uint8Array(K * N);
    const scalesHost = new Float32Array(G * N);
    const zerosHost = new Uint8Array(G * N);
    const lossHost = new Float64Array(nBlocks * ctas);
    d.memcpyDtoHAsync(codesHost, codes, K * N, st);
    d.memcpyDtoHAsync(scalesHost, scales, G * N * 4, st);
    d.memcpyDtoHAsync(zerosHost, zeros, G * N, st);
    d.memcpyDtoHAsync(lossHost, loss, nBlocks * ctas * 8, st);
    d.memcpyDtoHAsync(flagsHost, flags, 16, st);
    d.eventRecord(e4, st);
    d.eventSynchronize(e4);

    if (flagsHost[1] !== 0) throw new GptqError(`cuSOLVER dtrtri found a zero on the diagonal of the Cholesky factor (row ${flagsHost[1]}); the Hessian is not usable`);
    if (flagsHost[3] === 1) throw new RangeError("cannot quantize a group containing a non-finite value; the weights must be finite");
    if (flagsHost[3] === 2) throw new RangeError(`a quantization group needs a scale above ${F16_MAX}, the largest fp16; are the weights finite and sane?`);
    let lossSum = 0;
    for (let i = 0; i < lossHost.length; i++) lossSum += lossHost[i]!;

    this.lastProfile = {
      uploadMs: d.eventElapsedTime(e0, e1),
      factorMs: d.eventElapsedTime(e1, e2),
      solveMs: d.eventElapsedTime(e2, e3),
      downloadMs: d.eventElapsedTime(e3, e4),
      wallMs: performance.now() - t0,
      deviceBytes: this.deviceBytes,
    };
    return {
      weight: { spec, inDim: K, outDim: N, codes: codesHost, scales: scalesHost, zeros: zerosHost, gIdx: plan.gIdx },
      damp,
      attempts,
      loss: lossSum / 2,
      deadColumns: plan.deadColumns,
      perm: plan.perm,
    };
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    const d = this.#d;
    quietly(() => d.ctxSetCurrent(this.#ctx));
    quietly(() => d.streamSynchronize(this.#stream));
    for (const b of this.#buffers.values()) quietly(() => d.memFree(b.ptr));
    this.#buffers.clear();
    quietly(() => this.#blas.dispose());
    quietly(() => this.#solver.dispose());
    quietly(() => this.#launcher.dispose());
    for (const e of this.#events) quietly(() => d.eventDestroy(e));
    quietly(() => d.streamDestroy(this.#stream));
    quietly(() => d.primaryCtxRelease(d.device(this.#ordinal)));
  }
}
