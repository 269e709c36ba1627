// The CUDA backend: the Backend contract (backend.ts) over one GPU, reached through
// koffi (ffi/). Kernels come from ops.ts through DeviceOps (device_ops.ts); `linear`
// is cuBLASLt; decode steps replay CUDA graphs.
//
// Contract, beyond backend.ts:
//
// Memory. Nothing is allocated per step. Weights (`upload`), the model's workspace
// (`empty`), the KV cache (`createKvCache`: every layer's K and V in one allocation)
// and LoRA stacks (`createLoraStack`) are allocated once by their owners. The backend
// allocates the cuBLASLt workspace (32 MiB) at creation, and at capacity: the step
// metadata buffer with its pinned host staging twin, the LoRA shrink and attention
// split-K scratch, and the sampling buffers. `reserve(...)` allocates all of those up
// front; without it they are allocated by the first step that needs them (and grown,
// rarely, by a larger one). `memoryInfo()` reports the device's free/total bytes, so
// the engine sizes the KV cache after weights, workspace and `reserve` exist.
// Low-bit weights (`uploadQuantized`, repacked by quant_layout.ts) are one allocation each,
// released by `freeQuantized`; `linearQuantized` (quant_ops.ts) adds scratch by use: split-K
// partials and arrival counters, act-order's gathered x, and the prefill path's bf16 chunk,
// which `reserve` sizes for the quantized weights uploaded before it.
//
// Dtypes. Float uploads become bf16 unless `f32` is asked for (pass dtype "f32" when
// uploading invFreq, and for biases of linears with f32 outputs); i32 stays i32; f16 is
// not a device dtype here. Activations follow backend.ts's rule: matmul inputs bf16,
// matmul outputs (and everything computed from them up to the next matmul input: q/k/v
// after RoPE, gate/up, the o_proj / down_proj outputs), the residual stream and logits
// f32. `linear` writes bf16 or f32; every other op has one dtype form, listed in ops.ts,
// and names the operand and the dtype it wants when given another. `read` returns f32 (bf16 widened
// exactly) or i32, and waits for all issued work.
//
// Steps. `prepare(batch)` packs the step's metadata (token ids, positions, slots,
// LoRA slots, query starts, context lengths, block tables, sample rows, sampling
// parameters, and counts [numTokens, numSeqs, numSample, padTokens]) into the pinned
// staging buffer and uploads it with ONE host-to-device copy into fixed device
// addresses (step_layout.ts). Token rows are padded to bucket(numTokens) (1, 2, 4, 8,
// 16, 24, 32, 48, 64, 96, 128, 192, 256, then multiples of 64): padded rows have token
// 0, slot -1 (no KV write), adapter -1. Only the most recently prepared step may be
// run: its metadata occupies the device buffer.
//
// Views. `rows(t, n)` returns a view whose shape is [n, ...] (what `read` returns).
// When n is the current step's numTokens or numSample, the view is step-sized: kernels
// are launched over bucket(n) rows (capped at t's rows) and read the live count from
// the step's counts in device memory, so the launches of a forward depend only on the
// buckets, never on the exact counts. Any other view is launched over exactly n rows.
// A step-sized view follows the counts of whatever step runs it (that is what lets a
// replayed graph serve every step of its bucket).
//
// Graphs. `replay(key, forward)` on a step whose buckets (tokens, sequences, samples)
// were seen with this key before launches the captured graph; otherwise it runs
// `forward` eagerly once (which also warms up cuBLASLt plans and lazy scratch), then
// captures a second `forward` on the stream and instantiates it. The result is the
// forward's output tensor, re-viewed at the current step's row count. The engine
// calls it for decode-only steps (decodeGraphKey in step_layout.ts):
//   const key = decodeGraphKey(batch);   // "decode:<bucket>" or null
//   const logits = key && backend.replay ? backend.replay(key, () => model.forward(prepared, kv))
//                                        : model.forward(prepared, kv);
// Graphs bake device addresses in, so every free of a device buffer, a KV cache or a
// LoRA stack, and every metadata re-layout, drops all captured graphs (they are
// re-captured on next use). Whoever swaps a tensor inside the model for another
// without freeing the old one calls `invalidateGraphs()`. INLAID_CUDA_GRAPHS=0 (or
// `graphs: false`) runs everything eagerly.
//
// Errors. Every failing CUDA, NVRTC or cuBLASLt status is a CudaError; none aborts the
// process. A kernel fault (illegal address and the like) leaves the CUDA context
// unusable: the backend then refuses all further work with that first error.

import type {
  Backend, HostTensor, KvCache, KvCacheSpec, LoraStack, PendingSample, PendingSteps, PreparedStep, QuantizedTensor, SampleResult, StepBatch, Tensor,
} from "../backend.js";
import type { QuantBits, QuantizedWeight, QuantSpec } from "../../quant/types.js";
import { isDecodeOnly } from "../decode_steps.js";
import { uniform } from "../rng.js";
import { quietly } from "./ffi/errors.js";
import { bf16ToF32, f16ToF32, f32ToBf16, loraOutDims, numel, toF32, type DType, type Shape } from "../tensor.js";
import type { DeviceKv, DeviceLora, DeviceOps, DeviceStep, Operand, Scratch, StepRun } from "./device_ops.js";
import { CublasLt, timeCandidates, type GemmTuner } from "./ffi/cublaslt.js";
import {
  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
  CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE,
  CU_EVENT_DEFAULT, CU_EVENT_DISABLE_TIMING, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL, CU_STREAM_NON_BLOCKING,
  cudaDriver, cudaUnavailableReason, isStickyError, type CudaDriver, type PinnedBuffer,
} from "./ffi/driver.js";
import { buildKernels, type KernelImage } from "./ffi/nvrtc.js";
import type { Launcher } from "./launch.js";
import { gemmEarly, KernelLauncher } from "./launcher.js";
import { DeviceGraphLauncher } from "./device_graph.js";
import { CudaOps, EARLY_AFTER_LIBRARY, KERNEL_FILES, LORA_SLOTS_MAX_COLS, PDL_KERNELS, expandPerThread } from "./ops.js";
import { packQuantLayout, randomQuantLayout, type QuantLayout } from "./quant_layout.js";
import { QuantOps, dequantChunkCols, fusedCandidates, fusedCarriesShrink, fusedLaunchName, fusedPlan, kSplitApplies, kSplitCandidates, kSplitLaunch, kSplitMode, splitsFromEnv, tilesFromEnv, type DeviceQuantWeight, type FusedPlan } from "./quant_ops.js";
import {
  bucketRows, capacityShortfall, packStep, stagingViews, stepLayout,
  type PackedStep, type StagingViews, type StepCapacity, type StepLayout,
} from "./step_layout.js";
import { CudaTensor, type DeviceDType, type RowTrack } from "./tensor.js";

export { decodeGraphKey, bucketRows } from "./step_layout.js";
export { CudaError, NvrtcCompileError } from "./ffi/errors.js";

export interface CudaBackendOptions {
  /** Device ordinal (default INLAID_CUDA_DEVICE or 0). */
  readonly device?: number;
  /** Initial step capacity; the metadata buffer grows (dropping graphs) when a step exceeds it. */
  readonly maxTokens?: number;
  readonly maxSeqs?: number;
  readonly maxBlocksPerSeq?: number;
  /** Kernel architecture (default INLAID_CUDA_ARCH, else sm_<major><minor> of the device). */
  readonly arch?: string;
  /** Folder for cached CUBINs (default $INLAID_CACHE_DIR/kernels or ~/.cache/inlaid/kernels). */
  readonly cacheDir?: string;
  /** Kernel files and their folder (default: ops.ts's KERNEL_FILES in src/backend/cuda/kernels). */
  readonly kernelFiles?: readonly string[];
  readonly kernelsDir?: string;
  /** cuBLASLt workspace (default 32 MiB). */
  readonly workspaceBytes?: number;
  /** Capture and replay CUDA graphs (default true unless INLAID_CUDA_GRAPHS=0). */
  readonly graphs?: boolean;
  /**
   * Who launches replayed graphs (default INLAID_GRAPH_LAUNCH, else "device"): "device"
   * (fire-and-forget) and "tail" launch them from a one-node host graph's kernel
   * (device_graph.ts); the backend falls back to "host" when that cannot be set up.
   */
  readonly graphLaunch?: "host" | "device" | "tail";
  /** Another kernel set behind the DeviceOps seam (default: ops.ts's CudaOps over KERNEL_FILES). */
  readonly ops?: (launcher: Launcher, device: CudaDeviceInfo) => DeviceOps;
}

export interface CudaDeviceInfo {
  readonly ordinal: number;
  readonly name: string;
  readonly computeCapability: readonly [number, number];
  readonly smCount: number;
  readonly maxSharedPerBlockOptin: number;
  readonly l2Bytes: number;
  readonly driverVersion: number;
  readonly arch: string;
}

interface CudaPrepared extends PreparedStep {
  readonly owner: CudaBackend;
  readonly id: number;
  readonly packed: PackedStep;
  readonly run: StepRun;
}

class CudaKvCache implements KvCache {
  #freed = false;
  constructor(
    readonly owner: CudaBackend,
    readonly spec: KvCacheSpec,
    readonly ptr: bigint,
    /** Bytes of one layer's K (or V). */
    readonly layerBytes: number,
    readonly layers: readonly DeviceKv[],
  ) {}
  get freed(): boolean {
    return this.#freed;
  }
  markFreed(): void {
    this.#freed = true;
  }
}

/**
 * #quantPlans' key: a weight's shape and bits, the launch rows, the K-split kernel's mode for
 * them (INLAID_QGEMM_KSPLIT where it applies, else "off", as for a launch that carries a LoRA
 * shrink, which only the ring kernel does) and whether the launch carries that shrink.
 */
function quantPlanKey(q: DeviceQuantWeight, rows: number, kMode: ReturnType<typeof kSplitMode>, shrink = false): string {
  return `${q.bits},${q.K},${q.N},${rows},${kMode}${shrink ? ",lora" : ""}`;
}

/** Slots the all-slots LoRA GEMM covers for a step whose highest slot in use is span - 1: a power of two (0 when none). */
function loraSlotBucket(span: number): number {
  return span <= 0 ? 0 : 2 ** Math.ceil(Math.log2(span));
}

class CudaLoraStack implements LoraStack {
  #freed = false;
  constructor(
    readonly owner: CudaBackend,
    readonly numSlots: number,
    readonly maxRank: number,
    readonly inDim: number,
    readonly outDims: readonly number[],
    readonly outDim: number,
    /** One allocation: B, then ranks, then scales (layouts in device_ops.ts DeviceLora). */
    readonly ptr: bigint,
    /** A: its own allocation, or (attachLoraStack) the rows after the base weight's. */
    public a: bigint,
    readonly b: bigint,
    readonly ranks: bigint,
    readonly scales: bigint,
    /** Host copy of ranks [numSlots, splits] (to know whether a slot is in use). */
    readonly hostRanks: Int32Array,
  ) {}
  /** The base weight whose allocation holds A after its rows (attachLoraStack), or null. */
  attachedTo: CudaTensor | null = null;
  /** Shrink columns of the all-slots path: numSlots x splits x maxRank. */
  get slotCols(): number {
    return this.numSlots * this.outDims.length * this.maxRank;
  }
  get freed(): boolean {
    return this.#freed;
  }
  markFreed(): void {
    this.#freed = true;
  }
}

/** A quantized weight on the device: one allocation holding a QuantLayout's parts (quant_layout.ts). */
class CudaQuantTensor implements QuantizedTensor {
  #freed = false;
  readonly inDim: number;
  readonly outDim: number;
  readonly bits: QuantBits;
  constructor(
    readonly owner: CudaBackend,
    readonly ptr: bigint,
    readonly bytes: number,
    readonly dev: DeviceQuantWeight,
  ) {
    this.inDim = dev.K;
    this.outDim = dev.N;
    this.bits = dev.bits;
  }
  get freed(): boolean {
    return this.#freed;
  }
  markFreed(): void {
    this.#freed = true;
  }
}

interface Graph {
  readonly exec: bigint;
  /** The one-node host graph that launches `exec` from the device (device_graph.ts), or null. */
  readonly launcher: bigint | null;
  readonly out: CudaTensor;
  /** Kernel and copy nodes: a launch's host cost grows with them. */
  readonly nodes: number;
}

const DEFAULT_WORKSPACE = 32 << 20;
const align256 = (x: number): number => Math.ceil(x / 256) * 256;

export class CudaBackend implements Backend {
  readonly name = "cuda";
  readonly activationDtype = "bf16";
  readonly device: CudaDeviceInfo;
  /** How each kernel file was obtained at creation (cache hit or compile, and time). */
  readonly kernelImages: readonly KernelImage[];

  static #active: CudaBackend | null = null;

  readonly #d: CudaDriver;
  readonly #ordinal: number;
  readonly #ctx: bigint;
  readonly #stream: bigint;
  readonly #launcher: KernelLauncher;
  readonly #blas: CublasLt;
  readonly #ops: DeviceOps;
  readonly #workspace: bigint;
  readonly #graphsEnabled: boolean;
  /** Launches replayed graphs from the device (INLAID_GRAPH_LAUNCH=device, the default, or tail), else null. */
  readonly #deviceLaunch: DeviceGraphLauncher | null;
  /** False once a graph could not be set up for device launch: later ones launch from the host. */
  #deviceLaunchOn = true;
  /** replaySample keeps the sampling in the step's graph (INLAID_SAMPLE_IN_GRAPH=0: issued after it). */
  readonly #sampleInGraph = process.env.INLAID_SAMPLE_IN_GRAPH !== "0";
  /** Captured graphs of steps without adapter rows leave out the per-row LoRA launches (#loraLaunch). */
  readonly #skipIdleLora = process.env.INLAID_LORA_SKIP_IDLE === "1";
  readonly #stagingEvent: bigint;
  /** Recorded after each sampling's copy back; polled by a "poll" wait (INLAID_CUDA_SYNC). */
  #sampleEvent = 0n;
  /**
   * How `PendingSample.wait` waits: "spin" blocks in cuStreamSynchronize (the driver spins);
   * "poll" loops on cuEventQuery in JavaScript. Default INLAID_CUDA_SYNC, else "spin".
   */
  syncMode: "spin" | "poll" = process.env.INLAID_CUDA_SYNC === "poll" ? "poll" : "spin";
  readonly #timing: [bigint, bigint];

  readonly #owned = new Set<CudaTensor>();
  readonly #kvCaches = new Set<CudaKvCache>();
  readonly #loraStacks = new Set<CudaLoraStack>();
  readonly #quantized = new Set<CudaQuantTensor>();
  readonly #quant: QuantOps;
  /**
   * Most rows `linearQuantized` runs with the fused low-bit kernel; more take the dequantize +
   * cuBLASLt path (quant_ops.ts). Default 128 or INLAID_QUANT_FUSED_MAX_ROWS. Tests and
   * benchmarks may change it; graphs captured before keep the path they recorded.
   */
  quantFusedMaxRows = Number(process.env.INLAID_QUANT_FUSED_MAX_ROWS ?? 128);
  /** Fixed split-K count of the fused low-bit kernel (null: chosen per shape; default INLAID_QGEMM_SPLITS). */
  quantSplits: number | null = splitsFromEnv();
  /**
   * Fixed launch of the K-split low-bit kernel (quant_ops.ts kSplitLaunch) wherever it applies and
   * no LoRA shrink rides along (null: the tuner's or the rule's plan). For tests.
   */
  quantKSplit: { warps: number; depth: number } | null = null;
  /** GEMM and low-bit launch tuning (null with INLAID_GEMM_TUNE=0). */
  #tuner: GemmTuner | null = null;
  /** Fused low-bit launches by weight shape and rows (#quantPlan). */
  readonly #quantPlans = new Map<string, FusedPlan>();
  /** The all-slots decode LoRA path (attachLoraStack, linearLora); INLAID_LORA_SLOTS=0 turns it off. */
  readonly #loraSlotsOn: boolean;
  /** backend.ts loraFirst; absent with INLAID_LORA_FIRST=0 (the LoRA term is then added after the GEMM). */
  readonly loraFirst?: (out: Tensor, x: Tensor, stack: LoraStack, step: PreparedStep) => boolean;
  readonly #graphs = new Map<string, Graph>();
  /** Counts sampleAsync calls: a pending sample reads the one pinned host buffer, so only the latest may be waited for. */
  #sampleTicket = 0;

  // Step metadata: device buffer, pinned staging twin, layout. Null until the first step.
  #layout: StepLayout | null = null;
  #meta = 0n;
  #staging: PinnedBuffer | null = null;
  #stagingViews: StagingViews | null = null;
  /** Whether the staging buffer may still be read by an upload: "event" (prepare's, with
   * stagingEvent recorded after it), "stream" (a graph's), or false. */
  #stagingBusy: false | "event" | "stream" = false;
  #deviceStep: DeviceStep | null = null;
  #compactStep: DeviceStep | null = null;
  #initialCapacity: Partial<StepCapacity>;

  #current: CudaPrepared | null = null;
  #stepId = 0;
  #capturing = false;
  #kvBlockSize = 0;

  // Scratch by use ("lora", "attention", "sample"), sized at capacity; never allocated while capturing.
  readonly #scratch = new Map<string, Scratch>();
  #sampleHost: PinnedBuffer | null = null;

  #lost: Error | null = null;
  #disposed = false;

  private constructor(init: {
    driver: CudaDriver; ordinal: number; ctx: bigint; stream: bigint; launcher: KernelLauncher; blas: CublasLt;
    ops: DeviceOps; workspace: bigint; device: CudaDeviceInfo; images: readonly KernelImage[];
    graphs: boolean; stagingEvent: bigint; timing: [bigint, bigint];
    capacity: Partial<StepCapacity>; deviceLaunch: DeviceGraphLauncher | null;
  }) {
    this.#d = init.driver;
    this.#ordinal = init.ordinal;
    this.#ctx = init.ctx;
    this.#stream = init.stream;
    this.#loraSlotsOn = process.env.INLAID_LORA_SLOTS !== "0";
    if (process.env.INLAID_LORA_FIRST !== "0") this.loraFirst = (o, x, st, step) => this.#loraFirst(o, x, st, step);
    if (process.env.INLAID_UPLOAD_IN_GRAPH === "1") this.prepareReplaySample = (bt, k, f) => this.#prepareReplaySample(bt, k, f);
    this.#launcher = init.launcher;
    this.#blas = init.blas;
    this.#ops = init.ops;
    this.#workspace = init.workspace;
    this.device = init.device;
    this.kernelImages = init.images;
    this.#graphsEnabled = init.graphs;
    this.#deviceLaunch = init.deviceLaunch;
    this.#stagingEvent = init.stagingEvent;
    this.#timing = init.timing;
    this.#initialCapacity = init.capacity;
    this.#quant = new QuantOps(init.launcher, init.device.smCount);
    CudaBackend.#active = this;
    this.#blas.onEnqueue = () => {
      if (this.#capturing) this.#launcher.noteUntriggered();
    };
    if (process.env.INLAID_GEMM_TUNE !== "0") {
      this.#tuner = this.#gemmTuner();
      this.#blas.setTuner(this.#tuner);
    }
  }

  /** GEMM algorithm tuning (ffi/cublaslt.ts says why). The L2 flush writes a buffer of
   * twice the L2 size, allocated at the first flush and freed when the current synchronous
   * run (e.g. the warm-up forward that makes every plan) is over. */
  #gemmTuner(): GemmTuner {
    const flushBytes = Math.max(this.device.l2Bytes, 1 << 20) * 2;
    let flush: bigint | null = null;
    return {
      canTune: () => !this.#capturing,
      timeMs: (run) => this.timeMs(run),
      flushL2: () => {
        if (flush === null) {
          try {
            flush = this.#d.memAlloc(flushBytes);
          } catch {
            return; // no room: tune on a warm L2 rather than fail
          }
          // Freed after the current synchronous run: one buffer serves every plan it tunes.
          queueMicrotask(() => {
            if (flush !== null) this.#d.memFree(flush);
            flush = null;
          });
        }
        this.#d.memsetD8Async(flush, 0, flushBytes, this.#stream);
      },
      onTuned: (what, chosen, first, n) => {
        this.gemmTuning.push({ what, chosenUs: chosen, firstUs: first, candidates: n });
      },
    };
  }

  /** The GEMM plans tuned so far: the chosen and the heuristic's first candidate's time. */
  readonly gemmTuning: { what: string; chosenUs: number; firstUs: number; candidates: number }[] = [];

  // ------------------------------------------------------------------ creation

  /** Whether libcuda loads and reports at least one device. Never throws; loads nothing at import. */
  static available(): boolean {
    return cudaUnavailableReason() === null;
  }

  /** Why `available()` is false, or null. */
  static unavailableReason(): string | null {
    return cudaUnavailableReason();
  }

  static async create(opts: CudaBackendOptions = {}): Promise<CudaBackend> {
    const d = cudaDriver();
    const count = d.deviceCount();
    const ordinal = opts.device ?? Number(process.env.INLAID_CUDA_DEVICE ?? 0);
    if (!Number.isInteger(ordinal) || ordinal < 0 || ordinal >= count) {
      throw new Error(`CUDA device ${ordinal} does not exist (this machine has ${count}: 0..${count - 1})`);
    }
    const dev = d.device(ordinal);
    const undo: (() => void)[] = [];
    const cleanup = (): void => {
      for (const f of undo.reverse()) {
        try {
          f();
        } catch {
          // best effort while unwinding a failed creation
        }
      }
    };
    try {
      const ctx = d.primaryCtxRetain(dev);
      undo.push(() => d.primaryCtxRelease(dev));
      d.ctxSetCurrent(ctx);
      const major = d.deviceAttribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
      const minor = d.deviceAttribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
      const arch = opts.arch ?? process.env.INLAID_CUDA_ARCH ?? `sm_${major}${minor}`;
      const device: CudaDeviceInfo = {
        ordinal,
        name: d.deviceName(dev),
        computeCapability: [major, minor],
        smCount: d.deviceAttribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
        maxSharedPerBlockOptin: d.deviceAttribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev),
        l2Bytes: d.deviceAttribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, dev),
        driverVersion: d.driverVersion(),
        arch,
      };
      const stream = d.streamCreate(CU_STREAM_NON_BLOCKING);
      undo.push(() => d.streamDestroy(stream));
      const stagingEvent = d.eventCreate(CU_EVENT_DISABLE_TIMING);
      undo.push(() => d.eventDestroy(stagingEvent));
      const t0 = d.eventCreate(CU_EVENT_DEFAULT);
      undo.push(() => d.eventDestroy(t0));
      const t1 = d.eventCreate(CU_EVENT_DEFAULT);
      undo.push(() => d.eventDestroy(t1));

      // Kernels: ops.ts names the files; NVRTC builds them (or the cache has them).
      const files = opts.kernelFiles ?? KERNEL_FILES;
      const images = files.length > 0
        ? await buildKernels({
          files, arch, ...(opts.kernelsDir ? { dir: opts.kernelsDir } : {}), ...(opts.cacheDir ? { cacheDir: opts.cacheDir } : {}),
          // Switches compiled in by environment: PDL kernels trigger their dependents after
          // their wait unless told not to (kernels/common.cuh).
          extraOptions: [
            ...(process.env.INLAID_PDL_TRIGGER === "0" ? ["-DINLAID_PDL_TRIGGER=0"] : []),
            ...(expandPerThread() !== 1 ? [`-DINLAID_EXPAND_PER=${expandPerThread()}`] : []),
          ],
        })
        : [];
      d.ctxSetCurrent(ctx); // the awaits above ran on this thread, but keep the invariant explicit
      // Programmatic dependent launch needs sm_90 (the kernels' griddepcontrol.wait).
      const pdl = major >= 9 && process.env.INLAID_PDL !== "0" ? PDL_KERNELS : new Set<string>();
      const launcher = new KernelLauncher(d, stream, images, device.maxSharedPerBlockOptin, pdl, pdl.size > 0 && gemmEarly() ? EARLY_AFTER_LIBRARY : undefined);
      undo.push(() => launcher.dispose());

      const wsBytes = opts.workspaceBytes ?? DEFAULT_WORKSPACE;
      const workspace = d.memAlloc(wsBytes);
      undo.push(() => d.memFree(workspace));
      const blas = CublasLt.open(stream, workspace, wsBytes);
      undo.push(() => blas.dispose());


      const graphs = opts.graphs ?? process.env.INLAID_CUDA_GRAPHS !== "0";
      const capacity: Partial<StepCapacity> = {
        ...(opts.maxTokens ? { tokens: bucketRows(opts.maxTokens) } : {}),
        ...(opts.maxSeqs ? { seqs: bucketRows(opts.maxSeqs) } : {}),
        ...(opts.maxBlocksPerSeq ? { blocksPerSeq: opts.maxBlocksPerSeq } : {}),
      };
      // Device-side graph launch (device_graph.ts): 155 -> 90 us of host time per decode step.
      const how = opts.graphLaunch ?? process.env.INLAID_GRAPH_LAUNCH ?? "device";
      if (how !== "device" && how !== "tail" && how !== "host") {
        throw new Error(`INLAID_GRAPH_LAUNCH must be device, tail or host (got "${how}")`);
      }
      let deviceLaunch: DeviceGraphLauncher | null = null;
      if (graphs && major >= 9 && (how === "device" || how === "tail")) {
        try {
          deviceLaunch = await DeviceGraphLauncher.create(d, stream, arch, how === "tail" ? "tail" : "fire-and-forget", opts.cacheDir);
          const dl = deviceLaunch;
          undo.push(() => dl.dispose());
        } catch (e) {
          process.emitWarning(`inlaid: graphs are launched from the host: device launch is unavailable (${e instanceof Error ? e.message : String(e)})`);
        }
        d.ctxSetCurrent(ctx);
      }
      return new CudaBackend({
        driver: d, ordinal, ctx, stream, launcher, blas, workspace, device, images, deviceLaunch,
        ops: opts.ops ? opts.ops(launcher, device) : new CudaOps(launcher, { smCount: device.smCount, clusters: major >= 9 && process.env.INLAID_LORA_CLUSTERS !== "0" }),
        graphs, stagingEvent, timing: [t0, t1], capacity,
      });
    } catch (e) {
      cleanup();
      throw e;
    }
  }

  // ------------------------------------------------------------------ internal guards

  /** Makes this backend's context current (several backends may share the process). */
  #enter(): void {
    if (this.#disposed) throw new Error("the CUDA backend has been disposed");
    if (this.#lost) throw this.#lost;
    if (CudaBackend.#active !== this) {
      this.#d.ctxSetCurrent(this.#ctx);
      CudaBackend.#active = this;
    }
  }

  /** Remembers a sticky error (the context is gone) so later calls fail fast with it. */
  #note(e: unknown): void {
    if (isStickyError(e) && !this.#lost) {
      const err = e as Error;
      this.#lost = new Error(`the CUDA context is unusable after an earlier kernel fault (${err.message}); restart the process`);
    }
  }

  #t(t: Tensor): CudaTensor {
    if (!(t instanceof CudaTensor) || t.owner !== this) throw new Error("tensor does not belong to this CUDA backend");
    if (t.freed) throw new Error("use of a freed CUDA tensor");
    return t;
  }

  #prep(step: PreparedStep): CudaPrepared {
    const p = step as CudaPrepared;
    if (p.owner !== this) throw new Error("prepared step does not belong to this CUDA backend");
    if (p !== this.#current) throw new Error("a prepared step is only valid until the next prepare() on the CUDA backend");
    return p;
  }

  /** The step's live count for step-sized views; 0n (all `capRows` rows live) otherwise. */
  #liveRows(t: CudaTensor): bigint {
    if (t.track === "fixed" || !this.#deviceStep) return 0n;
    return this.#deviceStep.counts + (t.track === "tokens" ? 0n : 8n);
  }

  #operand(t: Tensor): Operand {
    const c = this.#t(t);
    return { ptr: c.ptr, dtype: c.dtype, rowsCap: c.capRows, cols: c.cols, liveRows: this.#liveRows(c) };
  }

  #alloc(bytes: number): bigint {
    try {
      return this.#d.memAlloc(bytes);
    } catch (e) {
      const m = this.memoryInfo();
      if (e instanceof Error) e.message += ` (device memory: ${(m.free / 2 ** 20).toFixed(0)} MiB free of ${(m.total / 2 ** 20).toFixed(0)} MiB)`;
      throw e;
    }
  }

  /** Frees device memory after the stream has finished with it, dropping graphs that may point at it. */
  #release(ptr: bigint): void {
    this.#dropGraphs();
    this.#d.streamSynchronize(this.#stream);
    this.#d.memFree(ptr);
  }

  #dropGraphs(): void {
    for (const g of this.#graphs.values()) {
      if (g.launcher !== null) this.#d.graphExecDestroy(g.launcher);
      this.#d.graphExecDestroy(g.exec);
    }
    this.#graphs.clear();
  }

  // ------------------------------------------------------------------ memory

  /** Free and total device memory in bytes (cuMemGetInfo). */
  memoryInfo(): { free: number; total: number } {
    this.#enter();
    return this.#d.memGetInfo();
  }

  upload(host: HostTensor, dtype?: DType): Tensor {
    this.#enter();
    if (this.#capturing) throw new Error("upload() while capturing a CUDA graph");
    const n = numel(host.shape);
    if (host.data.length !== n) throw new Error(`upload: shape [${host.shape.join(", ")}] needs ${n} elements, data has ${host.data.length}`);
    const target: DType = dtype ?? (host.dtype === "i32" ? "i32" : "bf16");
    let data: Float32Array | Uint16Array | Int32Array;
    switch (target) {
      case "i32":
        if (host.dtype !== "i32") throw new Error(`cannot upload ${host.dtype} data as i32`);
        data = host.data;
        break;
      case "bf16":
        if (host.dtype === "i32") throw new Error("cannot upload i32 data as bf16");
        data = host.dtype === "bf16" ? host.data : f32ToBf16(host.dtype === "f16" ? f16ToF32(host.data as Uint16Array) : (host.data as Float32Array));
        break;
      case "f32":
        if (host.dtype === "i32") throw new Error("cannot upload i32 data as f32");
        data = toF32(host.data, host.dtype);
        break;
      case "f16":
        throw new Error("the CUDA backend keeps floats as bf16 or f32; upload with dtype 'bf16' or 'f32'");
      default:
        return target satisfies never;
    }
    const t = this.#newTensor(host.shape, target);
    if (data.byteLength > 0) this.#d.memcpyHtoDAsync(t.ptr, data, data.byteLength, this.#stream);
    return t;
  }

  #newTensor(shape: Shape, dtype: DeviceDType): CudaTensor {
    const bytes = numel(shape) * (dtype === "bf16" ? 2 : 4);
    const ptr = this.#alloc(bytes);
    const t = new CudaTensor(this, [...shape], dtype, ptr, shape[0] ?? 1);
    this.#owned.add(t);
    return t;
  }

  empty(shape: Shape, dtype: DType): Tensor {
    this.#enter();
    if (dtype === "f16") throw new Error("the CUDA backend keeps floats as bf16 or f32; ask for 'bf16' or 'f32'");
    if (this.#capturing) throw new Error("empty() while capturing a CUDA graph: allocate before replay()");
    const t = this.#newTensor(shape, dtype);
    // Zeroed like the CPU backend's, once at allocation (never per step).
    if (t.bytes > 0) this.#d.memsetD8Async(t.ptr, 0, t.bytes, this.#stream);
    return t;
  }

  rows(t: Tensor, n: number): Tensor {
    const c = this.#t(t);
    const base = c.base ?? c;
    if (!Number.isInteger(n) || n < 0 || n > base.rows) throw new Error(`rows(${n}) of a tensor with ${base.rows} rows`);
    let track: RowTrack = "fixed";
    const cur = this.#current;
    if (cur) {
      if (n === cur.batch.numTokens) track = "tokens";
      else if (n === cur.batch.sampleRows.length) track = "sample";
    }
    // Step-sized views launch over the bucket and read the live count; any other view is exact.
    const cap = track === "fixed" ? n : Math.min(bucketRows(n), base.rows);
    return new CudaTensor(this, [n, ...base.shape.slice(1)], base.dtype, base.ptr, cap, track, base);
  }

  fillRandom(t: Tensor, seed: number, std: number): void {
    this.#enter();
    if (this.#capturing) throw new Error("fillRandom() while capturing a CUDA graph");
    const c = this.#t(t);
    if (c.dtype === "i32") throw new Error("fillRandom: the tensor must be bf16 or f32");
    const n = numel(c.shape);
    if (this.#ops.fillRandom) {
      this.#ops.fillRandom(this.#operand(c), n, seed, std);
      return;
    }
    // Host fallback (ops.ts has no fill kernel): the CPU backend's formula, in chunks.
    const a = std * Math.sqrt(3);
    const CHUNK = 1 << 22;
    const f = new Float32Array(Math.min(n, CHUNK));
    const bits = c.dtype === "bf16" ? new Uint16Array(f.length) : null;
    for (let start = 0; start < n; start += CHUNK) {
      const len = Math.min(CHUNK, n - start);
      const part = f.subarray(0, len);
      for (let i = 0; i < len; i++) part[i] = a * (2 * uniform(seed, start + i) - 1);
      const src = bits ? f32ToBf16(part, bits.subarray(0, len)) : part;
      const esize = bits ? 2 : 4;
      this.#d.memcpyHtoDAsync(c.ptr + BigInt(start * esize), src, len * esize, this.#stream);
    }
  }

  read(t: Tensor): Float32Array | Int32Array {
    this.#enter();
    const c = this.#t(t);
    if (this.#capturing) throw new Error("read() while capturing a CUDA graph");
    const n = numel(c.shape);
    try {
      this.#d.streamSynchronize(this.#stream);
      if (c.dtype === "bf16") {
        const bits = new Uint16Array(n);
        if (n > 0) this.#d.memcpyDtoHAsync(bits, c.ptr, n * 2, this.#stream);
        this.#d.streamSynchronize(this.#stream);
        return bf16ToF32(bits);
      }
      const out = c.dtype === "i32" ? new Int32Array(n) : new Float32Array(n);
      if (n > 0) this.#d.memcpyDtoHAsync(out, c.ptr, n * 4, this.#stream);
      this.#d.streamSynchronize(this.#stream);
      return out;
    } catch (e) {
      this.#note(e);
      throw e;
    }
  }

  free(t: Tensor): void {
    this.#enter();
    const c = this.#t(t);
    if (c.isView) return; // views share storage and are never freed
    if (this.#capturing) throw new Error("free() while capturing a CUDA graph");
    this.#owned.delete(c);
    c.markFreed();
    this.#release(c.ptr);
  }

  // ------------------------------------------------------------------ per-step state

  prepare(batch: StepBatch): PreparedStep {
    this.#enter();
    if (this.#capturing) throw new Error("prepare() while capturing a CUDA graph");
    try {
      const p = this.#pack(batch);
      this.#upload(p.packed.copyWords);
      return p;
    } catch (e) {
      this.#note(e);
      throw e;
    }
  }

  /** Packs `batch` into the staging buffer (once the previous upload has read it) and makes it current. */
  #pack(batch: StepBatch): CudaPrepared {
    if (!this.#layout || capacityShortfall(batch, this.#layout.capacity) !== null) this.#relayout(this.#fit(batch));
    const layout = this.#layout!;
    // The previous upload may still be reading the staging buffer (pinned copies are truly
    // async); one inside a graph has no event of its own.
    if (this.#stagingBusy === "event") this.#d.eventSynchronize(this.#stagingEvent);
    else if (this.#stagingBusy === "stream") this.#d.streamSynchronize(this.#stream);
    this.#stagingBusy = false;
    const packed = packStep(batch, layout, this.#stagingViews!);
    const run: StepRun = {
      // Which token regions a step uses depends only on padTokens, part of every graph key.
      step: packed.compact ? this.#compactStep! : this.#deviceStep!,
      padTokens: packed.padTokens,
      padSeqs: packed.padSeqs,
      padSample: packed.padSample,
      maxContext: layout.capacity.blocksPerSeq * this.#kvBlockSize,
      hasPrefill: packed.hasPrefill,
      hasDecode: packed.hasDecode,
    };
    const p: CudaPrepared = { batch, owner: this, id: ++this.#stepId, packed, run };
    this.#current = p;
    return p;
  }

  /** Uploads the staging buffer's first `words` to the step metadata, on the stream. */
  #upload(words: number): void {
    this.#d.memcpyHtoDAsyncPinned(this.#meta, this.#staging!.addr, words * 4, this.#stream);
    this.#d.eventRecord(this.#stagingEvent, this.#stream);
    this.#stagingBusy = "event";
  }

  /**
   * What a graph that uploads its step's metadata copies: fixed per graph key, so the live
   * sequences' block-table rows are covered by the bucket's (padded sequences' rows hold
   * stale ids that nothing reads: their context length is 0).
   */
  #graphUploadWords(packed: PackedStep): number {
    const layout = this.#layout!;
    return layout.compactTokens !== null && !packed.compact ? packed.copyWords : layout.blockTables + packed.padSeqs * layout.capacity.blocksPerSeq;
  }

  /** The smallest capacity that holds the current one, the creation hint and `batch`. */
  #fit(batch: StepBatch): StepCapacity {
    const old = this.#layout?.capacity;
    const init = this.#initialCapacity;
    return {
      tokens: Math.max(old?.tokens ?? 0, init.tokens ?? 0, bucketRows(Math.max(1, batch.numTokens))),
      seqs: Math.max(old?.seqs ?? 0, init.seqs ?? 0, bucketRows(Math.max(1, batch.numSeqs, batch.sampleRows.length))),
      blocksPerSeq: Math.max(old?.blocksPerSeq ?? 0, init.blocksPerSeq ?? 0, batch.maxBlocksPerSeq, 1),
    };
  }

  /** (Re)allocates the metadata buffers at `capacity`. Drops graphs (addresses change). */
  #relayout(capacity: StepCapacity): void {
    // Compact: decode steps' token rows sit in seqs-sized regions before the block tables,
    // so their upload stops after the live block-table rows (step_layout.ts).
    const layout = stepLayout(capacity, { compact: process.env.INLAID_COMPACT_STEP !== "0" });
    this.#d.streamSynchronize(this.#stream);
    this.#stagingBusy = false;
    if (this.#meta !== 0n) {
      this.#release(this.#meta);
      this.#meta = 0n;
    }
    if (this.#staging) {
      this.#d.memFreeHost(this.#staging);
      this.#staging = null;
    }
    this.#dropGraphs();
    const bytes = layout.totalWords * 4;
    this.#meta = this.#alloc(bytes);
    this.#d.memsetD8Async(this.#meta, 0, bytes, this.#stream);
    this.#staging = this.#d.memAllocHost(bytes);
    this.#stagingViews = stagingViews(this.#staging.buffer, 0, layout.totalWords);
    this.#layout = layout;
    const at = (words: number): bigint => this.#meta + BigInt(words * 4);
    this.#deviceStep = {
      counts: at(layout.counts), tokenIds: at(layout.tokenIds), positions: at(layout.positions),
      slotMapping: at(layout.slotMapping), loraSlots: at(layout.loraSlots), queryStart: at(layout.queryStart),
      contextLens: at(layout.contextLens), sampleRows: at(layout.sampleRows), blockTables: at(layout.blockTables),
      temperature: at(layout.temperature), topP: at(layout.topP), topK: at(layout.topK), seeds: at(layout.seeds),
      counters: at(layout.counters), blocksPerSeq: capacity.blocksPerSeq, capTokens: capacity.tokens, capSeqs: capacity.seqs,
    };
    // The same step read through the compact token regions (steps whose packing says so).
    const ct = layout.compactTokens;
    this.#compactStep = ct
      ? {
        ...this.#deviceStep, tokenIds: at(ct.tokenIds), positions: at(ct.positions), slotMapping: at(ct.slotMapping),
        loraSlots: at(ct.loraSlots), capTokens: capacity.seqs,
      }
      : null;
    this.#current = null;
    this.#ensureLoraScratch();
  }

  /**
   * Allocates, before the KV cache is sized from free memory, everything later steps
   * would otherwise allocate on first use: step metadata at capacity, LoRA and
   * attention scratch, and sampling buffers. Call it once the model and adapter pool
   * exist; a later larger step still works (it grows the buffers and drops graphs).
   */
  reserve(r: {
    readonly maxTokens: number;
    readonly maxSeqs: number;
    readonly maxBlocksPerSeq: number;
    readonly numHeads?: number;
    readonly headDim?: number;
    readonly vocabSize?: number;
    /** Most top logprobs one request may ask for (default 20, OpenAI's limit). */
    readonly maxTopLogprobs?: number;
  }): void {
    this.#enter();
    if (this.#capturing) throw new Error("reserve() while capturing a CUDA graph");
    const old = this.#layout?.capacity;
    const capacity: StepCapacity = {
      tokens: Math.max(old?.tokens ?? 0, bucketRows(Math.max(1, r.maxTokens))),
      seqs: Math.max(old?.seqs ?? 0, bucketRows(Math.max(1, r.maxSeqs))),
      blocksPerSeq: Math.max(old?.blocksPerSeq ?? 0, r.maxBlocksPerSeq, 1),
    };
    if (!old || old.tokens !== capacity.tokens || old.seqs !== capacity.seqs || old.blocksPerSeq !== capacity.blocksPerSeq) {
      this.#relayout(capacity);
    }
    this.#ensureLoraScratch();
    if (r.numHeads && r.headDim) this.#ensureAttentionScratch(r.numHeads, r.headDim);
    if (r.vocabSize) this.#ensureSampleBuffers(r.vocabSize, r.maxTopLogprobs ?? 20);
    this.#ensureQuantScratch(capacity.tokens);
  }

  /** Device addresses of the step metadata (null before the first step; fixed until a re-layout). */
  get deviceStep(): DeviceStep | null {
    return this.#deviceStep;
  }

  /** Step capacity of the metadata buffer (null before the first step). */
  get stepCapacity(): StepCapacity | null {
    return this.#layout?.capacity ?? null;
  }

  createKvCache(spec: KvCacheSpec): KvCache {
    this.#enter();
    const { numLayers, numBlocks, blockSize, numKvHeads, headDim } = spec;
    const layerBytes = align256(numBlocks * blockSize * numKvHeads * headDim * 2);
    const total = 2 * numLayers * layerBytes;
    const ptr = this.#alloc(total);
    this.#d.memsetD8Async(ptr, 0, total, this.#stream);
    const layers: DeviceKv[] = [];
    for (let l = 0; l < numLayers; l++) {
      layers.push({
        k: ptr + BigInt(2 * l * layerBytes),
        v: ptr + BigInt((2 * l + 1) * layerBytes),
        numBlocks, blockSize, numKvHeads, headDim,
      });
    }
    const kv = new CudaKvCache(this, { ...spec }, ptr, layerBytes, layers);
    this.#kvCaches.add(kv);
    this.#kvBlockSize = blockSize;
    return kv;
  }

  freeKvCache(kv: KvCache): void {
    this.#enter();
    const c = this.#kv(kv);
    this.#kvCaches.delete(c);
    c.markFreed();
    this.#release(c.ptr);
  }

  #kv(kv: KvCache): CudaKvCache {
    if (!(kv instanceof CudaKvCache) || kv.owner !== this) throw new Error("KV cache does not belong to this CUDA backend");
    if (kv.freed) throw new Error("use of a freed KV cache");
    return kv;
  }

  createLoraStack(numSlots: number, maxRank: number, inDim: number, outDims: number | readonly number[]): LoraStack {
    this.#enter();
    if (numSlots < 1 || maxRank < 1) throw new Error(`a LoRA stack needs at least one slot and rank 1 (got ${numSlots}, ${maxRank})`);
    const dims = loraOutDims(outDims);
    const S = dims.length, outDim = dims.reduce((a, b) => a + b, 0);
    const aBytes = numSlots * S * maxRank * inDim * 2;
    const bBytes = align256(numSlots * outDim * maxRank * 2);
    const rBytes = align256(numSlots * S * 4);
    const total = bBytes + 2 * rBytes;
    const a = this.#alloc(aBytes);
    this.#d.memsetD8Async(a, 0, aBytes, this.#stream);
    const ptr = this.#alloc(total);
    this.#d.memsetD8Async(ptr, 0, total, this.#stream);
    const b = ptr, ranks = b + BigInt(bBytes), scales = ranks + BigInt(rBytes);
    const s = new CudaLoraStack(this, numSlots, maxRank, inDim, dims, outDim, ptr, a, b, ranks, scales, new Int32Array(numSlots * S));
    this.#loraStacks.add(s);
    this.#ensureLoraScratch();
    return s;
  }

  writeLoraSlot(stack: LoraStack, slot: number, rank: number, scale: number, a: Float32Array, b: Float32Array, split = 0): void {
    this.#enter();
    if (this.#capturing) throw new Error("writeLoraSlot() while capturing a CUDA graph");
    const s = this.#lora(stack);
    if (!Number.isInteger(slot) || slot < 0 || slot >= s.numSlots) throw new Error(`LoRA slot ${slot} out of range (pool has ${s.numSlots})`);
    const S = s.outDims.length;
    if (!Number.isInteger(split) || split < 0 || split >= S) throw new Error(`LoRA split ${split} out of range (the stack has ${S})`);
    if (rank > s.maxRank) throw new Error(`LoRA rank ${rank} > max rank ${s.maxRank} of the pool`);
    const N = s.outDims[split]!;
    if (a.length !== rank * s.inDim || b.length !== N * rank) {
      throw new Error(`LoRA slot ${slot}: A must be [${rank}, ${s.inDim}] and B [${N}, ${rank}]`);
    }
    const R = s.maxRank;
    // A [rank, inDim] goes into the (slot, split)'s first rank rows; B [N, rank] is
    // re-strided to [N, maxRank] at the split's rows; everything past the rank stays zero.
    const aSplit = new Uint16Array(R * s.inDim);
    if (rank > 0) f32ToBf16(a, aSplit.subarray(0, rank * s.inDim));
    const bSplit = new Uint16Array(N * R);
    if (rank > 0) {
      const bBits = f32ToBf16(b);
      for (let o = 0; o < N; o++) bSplit.set(bBits.subarray(o * rank, (o + 1) * rank), o * R);
    }
    const row0 = s.outDims.slice(0, split).reduce((x, y) => x + y, 0);
    const st = this.#stream;
    const idx = slot * S + split;
    this.#d.memcpyHtoDAsync(s.a + BigInt(idx * aSplit.byteLength), aSplit, aSplit.byteLength, st);
    this.#d.memcpyHtoDAsync(s.b + BigInt((slot * s.outDim + row0) * R * 2), bSplit, bSplit.byteLength, st);
    this.#d.memcpyHtoDAsync(s.ranks + BigInt(4 * idx), new Int32Array([rank]), 4, st);
    this.#d.memcpyHtoDAsync(s.scales + BigInt(4 * idx), new Float32Array([rank > 0 ? scale : 0]), 4, st);
    s.hostRanks[idx] = rank;
  }

  freeLoraStack(stack: LoraStack): void {
    this.#enter();
    const s = this.#lora(stack);
    this.#loraStacks.delete(s);
    s.markFreed();
    if (s.attachedTo === null) this.#release(s.a);
    this.#release(s.ptr);
  }

  /**
   * backend.ts attachLoraStack: moves `weight` into a new allocation with the stack's A
   * right after its rows ([outDim + numSlots * splits * maxRank, inDim]), so that one GEMM
   * (linearLora) makes the base output and the shrink of the slots a step uses. Only for
   * ranks in 8-wide vectors (ops.ts loraSlotsPath); INLAID_LORA_SLOTS=0 declines.
   */
  attachLoraStack(stack: LoraStack, weight: Tensor): boolean {
    this.#enter();
    if (this.#capturing) throw new Error("attachLoraStack() while capturing a CUDA graph");
    const s = this.#lora(stack), w = this.#t(weight);
    if (!this.#loraSlotsOn || s.attachedTo !== null || w.isView || w.dtype !== "bf16") return false;
    if (w.rows !== s.outDim || w.cols !== s.inDim || s.maxRank % 8 !== 0) return false;
    const wBytes = w.bytes, aBytes = s.slotCols * s.inDim * 2;
    const ptr = this.#alloc(wBytes + aBytes);
    this.#d.memcpyDtoDAsync(ptr, w.ptr, wBytes, this.#stream);
    this.#d.memcpyDtoDAsync(ptr + BigInt(wBytes), s.a, aBytes, this.#stream);
    this.#release(w.ptr);
    this.#release(s.a);
    w.relocate(ptr);
    s.a = ptr + BigInt(wBytes);
    s.attachedTo = w;
    this.#ensureLoraScratch();
    return true;
  }

  /**
   * backend.ts linearLora: on decode-only steps, for a stack attached to `weight`, one GEMM
   * writes [base output | the shrink of slots 0..b-1] per row into scratch, b the power of
   * two at or above the step's highest slot + 1 (so graphs are keyed by b, not by the
   * slots), and a one-phase expand (kernels/lora.cu lora_bgmv_expand_slots) writes out =
   * base + the row's LoRA term. A step without adapter rows is the plain GEMM.
   */
  linearLora(out: Tensor, x: Tensor, weight: Tensor, stack: LoraStack, step: PreparedStep): boolean {
    this.#enter();
    const s = this.#lora(stack), w = this.#t(weight);
    if (s.attachedTo !== w) return false;
    const p = this.#prep(step);
    const wide = this.#scratch.get("lora_wide");
    const slots = Math.min(s.numSlots, loraSlotBucket(p.packed.loraSlotSpan));
    // Past LORA_SLOTS_MAX_COLS shrink columns the per-row kernel (the caller's path) reads less.
    const dl = this.#deviceLora(s);
    if (!wide || !this.#ops.loraSlotsPath(dl, p.run, slots)) return false;
    const o = this.#operand(out), xo = this.#operand(x);
    const K = s.inDim, N = s.outDim;
    if (xo.cols !== K || o.cols !== N) throw new Error(`linearLora: x must have ${K} columns and out ${N} (got ${xo.cols}, ${o.cols})`);
    const n = Math.min(o.rowsCap, xo.rowsCap);
    if (slots === 0) {
      this.#blas.matmul(o.ptr, "f32", xo.ptr, w.ptr, n, N, K);
      return true;
    }
    const ld = N + slots * s.outDims.length * s.maxRank;
    if (n * ld * 4 > wide.bytes) return false;
    this.#blas.matmul(wide.ptr, "f32", xo.ptr, w.ptr, n, ld, K, 0n, ld, null);
    const base: Operand = { ptr: wide.ptr, dtype: "f32", cols: ld, rowsCap: n, liveRows: o.liveRows };
    this.#ops.loraExpandSlots(o, base, wide.ptr + BigInt(N * 4), ld, dl, p.run);
    return true;
  }

  /**
   * Whether `linearQuantizedLora` takes decode steps (INLAID_QGEMM_LORA=0: the per-row LoRA
   * kernel instead). On an H100 a 4-bit Llama-2-7B decode step with 8 adapters took 6.488 ms
   * this way against 7.076 ms per-row, and 7.167 ms with the shrink as its own cuBLASLt GEMM
   * (removed).
   */
  quantLoraFused = process.env.INLAID_QGEMM_LORA !== "0";

  /**
   * INLAID_QGEMM_EARLY=1 (experimental, not measured): in captured graphs the expand after the
   * fused low-bit GEMM hangs off that GEMM's launch-order port (launcher.ts), as it does after
   * a cuBLASLt GEMM by default. Needs INLAID_GEMM_EARLY on.
   */
  readonly #quantEarly = process.env.INLAID_QGEMM_EARLY === "1";

  /**
   * backend.ts linearQuantizedLora: on decode-only steps, the low-bit GEMM's launch also makes
   * the LoRA shrink of every slot the step uses (quant_gemm_lora_*: more CTAs, each 32 rows of
   * the stack's A against the same x tiles), then lora_bgmv_expand_slots adds each row's term
   * in place: no shrink launch of its own. Declines act-order weights, launches past
   * quantFusedMaxRows, and what the all-slots path declines (loraSlotsPath).
   */
  linearQuantizedLora(out: Tensor, x: Tensor, w: QuantizedTensor, stack: LoraStack, step: PreparedStep, bias?: Tensor): boolean {
    this.#enter();
    if (!this.quantLoraFused) return false;
    const s = this.#lora(stack), q = this.#q(w).dev;
    if (s.attachedTo !== null || q.perm !== 0n) return false;
    const p = this.#prep(step);
    const slots = Math.min(s.numSlots, loraSlotBucket(p.packed.loraSlotSpan));
    const dl = this.#deviceLora(s);
    if (!this.#ops.loraSlotsPath(dl, p.run, slots)) return false;
    if (s.inDim !== q.K || s.outDim !== q.N) throw new Error(`linearQuantizedLora: the LoRA stack is ${s.inDim} -> ${s.outDim}, the weight ${q.K} -> ${q.N}`);
    const { o, xi, b } = this.#quantOperands("linearQuantizedLora", out, x, q, bias);
    const n = Math.min(o.capRows, xi.capRows);
    if (n === 0 || n > this.quantFusedMaxRows) return false;
    this.#ensureLoraScratch(); // before the skip below, so that an eager warm-up always sizes it
    if (slots === 0) {
      // No adapter row: the plain low-bit GEMM (a graph's key carries the slot bucket, 0 here).
      this.linearQuantized(out, x, w, bias);
      return true;
    }
    const t = this.#scratch.get("lora_slots_t");
    const cols = slots * s.outDims.length * s.maxRank;
    if (!t || n * cols * 4 > t.bytes) return false;
    const live = this.#liveRows(xi);
    // The plain launch's plan, unless that is the K-split kernel (no shrink): then the ring kernel's.
    const kept = this.#quantPlan(q, n, o.ptr, xi.ptr, live, b);
    const plan = kept.kDepth === undefined ? kept : this.#quantPlan(q, n, o.ptr, xi.ptr, live, b, true);
    // A is [numSlots][splits][maxRank][K]: its first `slots` slots are a [cols, K] weight.
    const shrink = { a: s.a, t: t.ptr, cols, ldT: cols };
    if (!fusedCarriesShrink(q.bits, plan.warps)) return false;
    this.#quant.fused(o.ptr, xi.ptr, live, n, q, b, 0n, 0n, plan, shrink);
    // The fused GEMM never triggers early (its dependents launch as it exits); with the
    // experiment the expand hangs off its launch-order port as after a cuBLASLt GEMM.
    if (this.#capturing && this.#quantEarly) this.#launcher.noteUntriggered();
    const oo = this.#operand(out);
    this.#ops.loraExpandSlots(oo, oo, t.ptr, cols, dl, p.run);
    return true;
  }

  #lora(stack: LoraStack): CudaLoraStack {
    if (!(stack instanceof CudaLoraStack) || stack.owner !== this) throw new Error("LoRA stack does not belong to this CUDA backend");
    if (stack.freed) throw new Error("use of a freed LoRA stack");
    return stack;
  }

  /**
   * Scratch `name` of at least `bytes`, allocated outside graphs. Growing frees the old
   * buffer, which drops captured graphs (they may point at it).
   */
  #ensureScratch(name: string, bytes: number): Scratch {
    const have = this.#scratch.get(name);
    if (have && have.bytes >= bytes) return have;
    if (this.#capturing) {
      throw new Error(`the ${name} scratch would have to grow to ${bytes} bytes while capturing a CUDA graph; call reserve() first`);
    }
    if (have) {
      this.#scratch.delete(name);
      this.#release(have.ptr);
    }
    const size = align256(Math.max(256, bytes));
    const s: Scratch = { ptr: this.#alloc(size), bytes: size };
    this.#scratch.set(name, s);
    return s;
  }

  /** The shrink intermediate f32 [capTokens, largest maxRank]; for attached stacks
   * (linearLora, decode-only steps: one row per sequence) f32 [capSeqs, outDim + min(slotCols, LORA_SLOTS_MAX_COLS)];
   * with quantLoraFused, for the others (linearQuantizedLora's shrink) f32 [capSeqs, min(slotCols, LORA_SLOTS_MAX_COLS)]. */
  #ensureLoraScratch(): Scratch | null {
    let rank = 0, wide = 0, narrow = 0;
    for (const s of this.#loraStacks) {
      rank = Math.max(rank, s.maxRank);
      if (s.attachedTo !== null) wide = Math.max(wide, s.outDim + Math.min(s.slotCols, LORA_SLOTS_MAX_COLS));
      else if (this.quantLoraFused && s.maxRank % 8 === 0) narrow = Math.max(narrow, Math.min(s.slotCols, LORA_SLOTS_MAX_COLS));
    }
    const tokens = this.#layout?.capacity.tokens ?? 0;
    if (rank === 0 || tokens === 0) return null;
    if (wide > 0) this.#ensureScratch("lora_wide", this.#layout!.capacity.seqs * wide * 4);
    // linearQuantizedLora's shrink output f32 [capSeqs, slot columns].
    if (narrow > 0) this.#ensureScratch("lora_slots_t", this.#layout!.capacity.seqs * narrow * 4);
    return this.#ensureScratch("lora", tokens * rank * 4);
  }

  #ensureAttentionScratch(numHeads: number, headDim: number): Scratch {
    const seqs = this.#layout?.capacity.seqs ?? 1;
    return this.#ensureScratch("attention", this.#ops.attentionScratchBytes(seqs, numHeads, headDim));
  }

  // ------------------------------------------------------------------ ops

  embedding(out: Tensor, table: Tensor, step: PreparedStep): void {
    this.#enter();
    const p = this.#prep(step);
    this.#ops.embedding(this.#operand(out), this.#operand(table), p.run);
  }

  rmsnorm(out: Tensor, x: Tensor, w: Tensor, eps: number): void {
    this.#enter();
    this.#ops.rmsnorm(this.#operand(out), this.#operand(x), this.#operand(w), eps);
  }

  addRmsnorm(out: Tensor, residual: Tensor, x: Tensor, w: Tensor, eps: number): void {
    this.#enter();
    this.#ops.addRmsnorm(this.#operand(out), this.#operand(residual), this.#operand(x), this.#operand(w), eps);
  }

  linear(out: Tensor, x: Tensor, w: Tensor, bias?: Tensor, accumulate = false): void {
    this.#enter();
    const o = this.#t(out), xi = this.#t(x), wi = this.#t(w);
    const K = xi.cols, N = wi.rows;
    if (wi.cols !== K) throw new Error(`linear: x has ${K} columns but the weight has ${wi.cols}`);
    if (o.cols !== N) throw new Error(`linear: out has ${o.cols} columns, the weight has ${N} rows`);
    if (o.rows !== xi.rows) throw new Error(`linear: out has ${o.rows} rows, x has ${xi.rows}`);
    if (xi.dtype !== "bf16" || wi.dtype !== "bf16") throw new Error(`linear: x and w must be bf16 (got ${xi.dtype}, ${wi.dtype})`);
    if (o.dtype === "i32") throw new Error("linear: out must be bf16 or f32");
    let b = 0n;
    if (bias) {
      const bi = this.#t(bias);
      // cuBLASLt's bias epilogue reads a vector of D's type.
      if (bi.dtype !== o.dtype) {
        throw new Error(`linear: bias must have the output's dtype (${o.dtype}); got ${bi.dtype}` +
          (o.dtype === "f32" ? " (upload biases with dtype 'f32')" : ""));
      }
      if (numel(bi.shape) !== N) throw new Error(`linear: bias has ${numel(bi.shape)} elements, expected ${N}`);
      b = bi.ptr;
    }
    // Rows: the launch capacity (bucket) so eager and replayed steps run the same GEMM.
    const n = Math.min(o.capRows, xi.capRows);
    // An accumulating GEMM that is about to tune its plan tunes into scratch, not onto out.
    const tunes = accumulate && this.#blas.wouldTune(n, N, K, o.dtype, b);
    const acc = accumulate
      ? { tuneOut: tunes ? this.#ensureScratch("gemm_tune_out", n * N * (o.dtype === "f32" ? 4 : 2)).ptr : 0n }
      : null;
    this.#blas.matmul(o.ptr, o.dtype, xi.ptr, wi.ptr, n, N, K, b, N, acc);
  }

  gram(out: Tensor, x: Tensor, accumulate: boolean, alpha = 1): void {
    this.#enter();
    const o = this.#t(out), xi = this.#t(x);
    const K = xi.cols;
    if (xi.dtype !== "bf16") throw new Error(`gram: x must be bf16 (got ${xi.dtype})`);
    if (o.dtype !== "f32" || o.rows !== K || o.cols !== K) throw new Error(`gram: out must be f32 [${K}, ${K}] for x of ${K} columns, got ${o.dtype} [${o.shape.join(", ")}]`);
    // x's logical rows, not a step view's launch bucket: padding rows must not enter the sum.
    this.#blas.gram(o.ptr, xi.ptr, xi.rows, K, accumulate, alpha);
  }

  // ------------------------------------------------------------------ quantized weights

  /** Repacks a GPTQ weight into the low-bit kernels' layout and uploads it (QuantLayoutError: not a kernel shape). */
  uploadQuantized(q: QuantizedWeight): QuantizedTensor {
    this.#enter();
    if (this.#capturing) throw new Error("uploadQuantized() while capturing a CUDA graph");
    return this.uploadQuantLayout(packQuantLayout(q));
  }

  /** Uploads an already packed layout (what uploadQuantized does after packing; benchmarks reuse one packing). */
  uploadQuantLayout(l: QuantLayout): QuantizedTensor {
    this.#enter();
    if (this.#capturing) throw new Error("uploadQuantLayout() while capturing a CUDA graph");
    const parts: ArrayBufferView[] = [l.words, l.scales, ...(l.zeros ? [l.zeros] : []), ...(l.perm ? [l.perm] : [])];
    const offsets: number[] = [];
    let bytes = 0;
    for (const p of parts) {
      offsets.push(bytes);
      bytes += align256(p.byteLength);
    }
    const ptr = this.#alloc(bytes);
    parts.forEach((p, i) => this.#d.memcpyHtoDAsync(ptr + BigInt(offsets[i]!), p, p.byteLength, this.#stream));
    const at = (i: number): bigint => ptr + BigInt(offsets[i]!);
    const dev: DeviceQuantWeight = {
      bits: l.bits, K: l.K, N: l.N, groupSize: l.groupSize, groups: l.groups, symZero: l.symZero,
      words: at(0), scales: at(1), zeros: l.zeros ? at(2) : 0n, perm: l.perm ? at(l.zeros ? 3 : 2) : 0n,
    };
    const t = new CudaQuantTensor(this, ptr, bytes, dev);
    this.#quantized.add(t);
    return t;
  }

  /** Random symmetric low-bit weights in the kernels' layout, made without packing (`--load-format dummy`). */
  randomQuantized(spec: QuantSpec, inDim: number, outDim: number, seed: number, std: number): QuantizedTensor {
    this.#enter();
    if (this.#capturing) throw new Error("randomQuantized() while capturing a CUDA graph");
    return this.uploadQuantLayout(randomQuantLayout(spec.bits, inDim, outDim, spec.groupSize, seed, std));
  }

  freeQuantized(w: QuantizedTensor): void {
    this.#enter();
    if (this.#capturing) throw new Error("freeQuantized() while capturing a CUDA graph");
    const q = this.#q(w);
    this.#quantized.delete(q);
    q.markFreed();
    this.#release(q.ptr);
  }

  /** Device bytes of every quantized weight uploaded and not freed. */
  get quantizedBytes(): number {
    let n = 0;
    for (const q of this.#quantized) n += q.bytes;
    return n;
  }

  #q(w: QuantizedTensor): CudaQuantTensor {
    if (!(w instanceof CudaQuantTensor) || w.owner !== this) throw new Error("quantized weight does not belong to this CUDA backend");
    if (w.freed) throw new Error("use of a freed quantized weight");
    return w;
  }

  /** out f32 [n, N], x bf16 [n, K] and bias f32 [N] (or none) of a low-bit linear `op`, checked; b: the bias pointer or 0n. */
  #quantOperands(op: string, out: Tensor, x: Tensor, q: DeviceQuantWeight, bias?: Tensor): { o: CudaTensor; xi: CudaTensor; b: bigint } {
    const o = this.#t(out), xi = this.#t(x);
    const { K, N } = q;
    if (xi.cols !== K) throw new Error(`${op}: x has ${xi.cols} columns but the weight has ${K} inputs`);
    if (o.cols !== N) throw new Error(`${op}: out has ${o.cols} columns, the weight has ${N} outputs`);
    if (o.rows !== xi.rows) throw new Error(`${op}: out has ${o.rows} rows, x has ${xi.rows}`);
    if (xi.dtype !== "bf16") throw new Error(`${op}: x must be bf16 (got ${xi.dtype})`);
    if (o.dtype !== "f32") throw new Error(`${op}: out must be f32 (got ${o.dtype})`);
    if (!bias) return { o, xi, b: 0n };
    const bi = this.#t(bias);
    if (bi.dtype !== "f32") throw new Error(`${op}: bias must be f32 (got ${bi.dtype}; upload biases with dtype 'f32')`);
    if (numel(bi.shape) !== N) throw new Error(`${op}: bias has ${numel(bi.shape)} elements, expected ${N}`);
    return { o, xi, b: bi.ptr };
  }

  /** The fused launch kept for `rows` rows of w (#quantPlan), as quant_ops.ts fusedLaunchName, or null before its first call. */
  quantLaunch(w: QuantizedTensor, rows: number): string | null {
    const q = this.#q(w).dev;
    const p = this.#quantPlans.get(quantPlanKey(q, rows, kSplitApplies(q, rows) ? kSplitMode() : "off"));
    return p ? fusedLaunchName(p, rows) : null;
  }

  /**
   * out f32 [n, N] = x bf16 [n, K] @ dequantize(w)^T (+ bias f32): the fused low-bit kernel up
   * to quantFusedMaxRows rows, else dequantize (in column chunks) + cuBLASLt (quant_ops.ts).
   * Like `linear`, it runs over the views' launch rows (the bucket), so eager and replayed
   * steps launch the same kernels.
   */
  linearQuantized(out: Tensor, x: Tensor, w: QuantizedTensor, bias?: Tensor): void {
    this.#enter();
    const q = this.#q(w).dev;
    const { K, N } = q;
    const { o, xi, b } = this.#quantOperands("linearQuantized", out, x, q, bias);
    const n = Math.min(o.capRows, xi.capRows);
    if (n === 0) return;
    let xp = xi.ptr;
    if (q.perm !== 0n) {
      const g = this.#ensureScratch("quant_gather", n * K * 2);
      this.#quant.gather(g.ptr, this.#operand(xi), n, q);
      xp = g.ptr;
    }
    if (n <= this.quantFusedMaxRows) {
      const plan = this.#quantPlan(q, n, o.ptr, xp, this.#liveRows(xi), b);
      const partials = plan.partialBytes > 0 ? this.#ensureScratch("quant_partials", plan.partialBytes).ptr : 0n;
      const counters = plan.counterBytes > 0 ? this.#ensureZeroedScratch("quant_counters", plan.counterBytes).ptr : 0n;
      this.#quant.fused(o.ptr, xp, this.#liveRows(xi), n, q, b, partials, counters, plan);
      return;
    }
    const chunk = dequantChunkCols(K, N);
    const scratch = this.#ensureScratch("quant_dequant", chunk * 32 * K * 2).ptr;
    for (let c0 = 0; c0 < N / 32; c0 += chunk) {
      const nc = Math.min(chunk, N / 32 - c0);
      this.#quant.dequant(scratch, q, c0, nc);
      this.#blas.matmul(o.ptr + BigInt(c0 * 32 * 4), "f32", xp, scratch, n, nc * 32, K, b === 0n ? 0n : b + BigInt(c0 * 32 * 4), N);
    }
  }

  /**
   * The fused low-bit launch for `rows` rows of q, chosen once per (shape, rows) and kept,
   * so eager and replayed steps run the same launch. Eagerly, with GEMM tuning on (as for
   * cuBLASLt plans), every (token tiles, warps, splits) candidate is timed on these operands, L2 flushed
   * before each run, and the fastest kept: fusedPlan's rule missed the fastest launch by up
   * to 6% on an H100 sweep (bench/quant_gemm.ts --sweep: K 4096 N 11008 at 1 and 8 rows took
   * 8 splits where 4 ran 14.3 against 14.8 µs). While capturing, or with tuning off, the
   * rule's plan. A forced split, warp or token-tile count (quantSplits, INLAID_QGEMM_WARPS,
   * INLAID_QGEMM_TILES) is followed and not kept. INLAID_QGEMM_KSPLIT (quant_ops.ts kSplitMode)
   * adds the K-split kernel's launches to the candidates, or times only them, where they apply;
   * `shrink`: a launch that carries the LoRA shrink (the ring kernel's candidates only).
   */
  #quantPlan(q: DeviceQuantWeight, rows: number, out: bigint, x: bigint, live: bigint, bias: bigint, shrink = false): FusedPlan {
    const kApplies = !shrink && kSplitApplies(q, rows);
    const kFixed = this.quantKSplit;
    if (kFixed !== null && kApplies) return kSplitLaunch(q.bits, q.K, q.N, rows, kFixed.warps, kFixed.depth);
    const kMode = kApplies ? kSplitMode() : "off";
    if (this.quantSplits !== null || process.env.INLAID_QGEMM_WARPS || tilesFromEnv(rows) !== null) return this.#quant.plan(q, rows, this.quantSplits);
    const key = quantPlanKey(q, rows, kMode, shrink);
    const have = this.#quantPlans.get(key);
    if (have) return have;
    const ks = kMode === "off" ? [] : kSplitCandidates(q.bits, q.K, q.N, rows);
    // "only": the K-split launches alone (the rule's pick among them: 8 warps, the shallowest depth).
    let plan = kMode === "only" ? ks.find((p) => p.warps === 8) ?? ks[0]! : this.#quant.plan(q, rows);
    const tuner = this.#tuner;
    if (!this.#capturing && tuner !== null && tuner.canTune()) {
      const ring = kMode === "only" ? [] : fusedCandidates(q.bits, q.K, q.N, rows);
      const candidates = [...ring, ...ks];
      plan = candidates[timeCandidates(tuner, candidates.length, (i) => {
        this.#quant.fused(out, x, live, rows, q, bias, 0n, 0n, candidates[i]!);
        return true;
      }).choice]!;
    }
    this.#quantPlans.set(key, plan);
    return plan;
  }

  /** As #ensureScratch, zero-filled whenever it is (re)allocated (split-K arrival counters). */
  #ensureZeroedScratch(name: string, bytes: number): Scratch {
    const before = this.#scratch.get(name);
    const s = this.#ensureScratch(name, bytes);
    if (s !== before) this.#d.memsetD8Async(s.ptr, 0, s.bytes, this.#stream);
    return s;
  }

  /** The quantized linears' scratch at a capacity of `tokens` rows (so no step allocates it later). */
  #ensureQuantScratch(tokens: number): void {
    if (this.#quantized.size === 0 || tokens === 0) return;
    let partials = 0, counters = 0, gather = 0, dequant = 0;
    const fusedMax = Math.min(tokens, this.quantFusedMaxRows);
    for (const { dev: q } of this.#quantized) {
      for (let r = 1; r <= fusedMax; r = bucketRows(r) + 1) {
        const p = fusedPlan(q.bits, q.K, q.N, Math.min(bucketRows(r), tokens), this.device.smCount, this.quantSplits);
        partials = Math.max(partials, p.partialBytes);
        counters = Math.max(counters, p.counterBytes);
      }
      if (q.perm !== 0n) gather = Math.max(gather, bucketRows(tokens) * q.K * 2);
      if (tokens > this.quantFusedMaxRows) dequant = Math.max(dequant, dequantChunkCols(q.K, q.N) * 32 * q.K * 2);
    }
    if (partials > 0) this.#ensureScratch("quant_partials", partials);
    if (counters > 0) this.#ensureZeroedScratch("quant_counters", counters);
    if (gather > 0) this.#ensureScratch("quant_gather", gather);
    if (dequant > 0) this.#ensureScratch("quant_dequant", dequant);
  }

  lora(out: Tensor, x: Tensor, stack: LoraStack, step: PreparedStep): void {
    this.#enter();
    const p = this.#prep(step);
    const dl = this.#loraLaunch(stack, p);
    if (dl) this.#ops.lora(this.#operand(out), this.#operand(x), dl, p.run);
  }

  #loraFirst(out: Tensor, x: Tensor, stack: LoraStack, step: PreparedStep): boolean {
    this.#enter();
    const p = this.#prep(step);
    const dl = this.#loraLaunch(stack, p);
    if (!dl) return false;
    const o = this.#operand(out), xo = this.#operand(x);
    const write = this.#ops.loraWrites(dl, p.run);
    // Otherwise (steps with prefill rows: eager) zero the launch rows, then add.
    if (!write) this.#d.memsetD32Async(o.ptr, 0, Math.min(o.rowsCap, xo.rowsCap) * o.cols, this.#stream);
    this.#ops.lora(o, xo, dl, p.run, write);
    return true;
  }

  /** The stack as the LoRA kernels see it, or null when this (eager) step has no adapter row. */
  #loraLaunch(stack: LoraStack, p: CudaPrepared): DeviceLora | null {
    const s = this.#lora(stack);
    // Sized here, before the skip below, so that an eager warm-up always allocates it.
    this.#ensureLoraScratch();
    // Eagerly, a step without adapters skips the launches; a captured graph has them, unless
    // INLAID_LORA_SKIP_IDLE=1 (experimental, not measured yet): a graph's key carries the
    // step's slot bucket, 0 only for steps without adapter rows, so its launches are no-ops.
    if (!p.packed.anyLora && (!this.#capturing || this.#skipIdleLora)) return null;
    return this.#deviceLora(s);
  }

  #deviceLora(s: CudaLoraStack): DeviceLora {
    return {
      a: s.a, b: s.b, ranks: s.ranks, scales: s.scales, numSlots: s.numSlots, maxRank: s.maxRank,
      inDim: s.inDim, outDim: s.outDim, outDims: s.outDims, scratch: this.#scratch.get("lora")?.ptr ?? 0n,
    };
  }

  rope(q: Tensor, k: Tensor, v: Tensor, qkv: Tensor, invFreq: Tensor, headDim: number, step: PreparedStep): void {
    this.#enter();
    const p = this.#prep(step);
    const f = this.#t(invFreq);
    if (f.dtype !== "f32") throw new Error("rope: invFreq must be an f32 tensor (upload it with dtype 'f32')");
    this.#ops.rope(this.#operand(q), this.#operand(k), this.#operand(v), this.#operand(qkv), this.#operand(f), headDim, p.run);
  }

  attention(out: Tensor, q: Tensor, k: Tensor, v: Tensor, kv: KvCache, layer: number, scale: number, step: PreparedStep): void {
    this.#enter();
    const p = this.#prep(step);
    const cache = this.#kv(kv);
    const l = cache.layers[layer];
    if (!l) throw new Error(`attention: layer ${layer} outside the KV cache's ${cache.layers.length} layers`);
    const qo = this.#operand(q);
    const scratch = this.#ensureAttentionScratch(qo.cols / l.headDim, l.headDim);
    this.#ops.attention(this.#operand(out), qo, this.#operand(k), this.#operand(v), l, scale, p.run, scratch);
  }

  siluMul(out: Tensor, gateUp: Tensor): void {
    this.#enter();
    this.#ops.siluMul(this.#operand(out), this.#operand(gateUp));
  }

  gatherRows(out: Tensor, x: Tensor, step: PreparedStep): void {
    this.#enter();
    const p = this.#prep(step);
    this.#ops.gatherRows(this.#operand(out), this.#operand(x), p.run);
  }

  sample(logits: Tensor, step: PreparedStep): SampleResult {
    return this.sampleAsync(logits, step).wait();
  }

  sampleAsync(logits: Tensor, step: PreparedStep): PendingSample {
    this.#enter();
    if (this.#capturing) throw new Error("sample() while capturing a CUDA graph: sample after replay()");
    const p = this.#prep(step);
    const lg = this.#t(logits);
    const m = p.batch.sampleRows.length;
    const K = p.batch.sampling.numTopLogprobs;
    if (m === 0) {
      const none: SampleResult = { tokens: new Int32Array(0), logprobs: new Float32Array(0), topIds: new Int32Array(0), topLogprobs: new Float32Array(0) };
      return { wait: () => none };
    }
    try {
      this.#issueSample(lg, p.run, K);
      this.#recordSampleEvent();
    } catch (e) {
      this.#note(e);
      throw e;
    }
    return this.#pendingSample(m, K, lg.capRows);
  }

  /**
   * Issues sampling of logits f32 [cap, V] and the copy of its outputs to the pinned host
   * buffer. Outputs are laid out by the logits' row capacity, not the live count (tokens
   * [cap], logprobs [cap], topIds [cap*K], topLogprobs [cap*K]), so that every address and
   * size is the same on every step of a graph bucket: `replaySample` captures this.
   */
  #issueSample(lg: CudaTensor, run: StepRun, K: number, multi?: { block: number; blocks: number; advanceBlockSize: number }): void {
    if (lg.dtype !== "f32") throw new Error("sample: logits must be f32");
    const cap = lg.capRows;
    // Sized for every step of a multi-step call at its first (growing it later would free
    // the buffer the earlier steps' copies went to).
    const { out, scratch } = this.#ensureSampleBuffers(lg.cols, K, cap, multi?.blocks ?? 1);
    const hostBlock = multi?.block ?? 0, advanceBlockSize = multi?.advanceBlockSize ?? 0;
    const base = out.ptr;
    this.#ops.sample(this.#operand(lg), run, {
      tokens: base,
      logprobs: base + BigInt(4 * cap),
      topIds: base + BigInt(8 * cap),
      topLogprobs: base + BigInt(8 * cap + 4 * cap * K),
      numTop: K,
      scratch: scratch.ptr,
      scratchBytes: scratch.bytes,
    });
    // Multi-step (decodeSteps): the next step's metadata from these tokens, before the copy,
    // so that the next step's first kernel follows a copy node (kernels/step.cu says why).
    if (advanceBlockSize > 0) this.#ops.advanceDecode(run, base, advanceBlockSize);
    const bytes = cap * (2 + 2 * K) * 4;
    this.#d.memcpyDtoHAsyncPinned(this.#sampleHost!.addr + BigInt(hostBlock * bytes), base, bytes, this.#stream);
  }

  #recordSampleEvent(): void {
    if (this.syncMode !== "poll") return;
    if (this.#sampleEvent === 0n) this.#sampleEvent = this.#d.eventCreate(CU_EVENT_DISABLE_TIMING);
    this.#d.eventRecord(this.#sampleEvent, this.#stream);
  }

  /** Waits for the sampling issued last (m live rows of a `cap`-row layout, K top logprobs) and reads it. */
  #pendingSample(m: number, K: number, cap: number): PendingSample {
    const ticket = ++this.#sampleTicket;
    return {
      wait: (): SampleResult => {
        this.#waitSample(ticket);
        return this.#readSample(m, K, cap, 0);
      },
    };
  }

  /** Waits for the sampling issued last (its ticket) to reach the host. */
  #waitSample(ticket: number): void {
    if (ticket !== this.#sampleTicket) throw new Error("a pending sample was overtaken by a later one; wait() for each before sampling again");
    try {
      if (this.syncMode === "poll" && this.#sampleEvent !== 0n) {
        // The event follows everything issued so far (nothing is issued before wait()).
        while (!this.#d.eventQuery(this.#sampleEvent));
      } else this.#d.streamSynchronize(this.#stream);
    } catch (e) {
      this.#note(e);
      throw e;
    }
    // Everything issued is done, the staging upload included: the next prepare() need
    // not wait on its event (one driver call less per step).
    this.#stagingBusy = false;
  }

  /** Step `block`'s sampling outputs in the pinned host buffer (m live rows of a `cap`-row layout). */
  #readSample(m: number, K: number, cap: number, block: number): SampleResult {
    const host = this.#sampleHost!;
    const words = cap * (2 + 2 * K);
    const i32 = new Int32Array(host.buffer, block * words * 4, words);
    const f32 = new Float32Array(host.buffer, block * words * 4, words);
    const topIds = new Int32Array(m * K), topLogprobs = new Float32Array(m * K);
    // Top entries are [cap, K] rows: the first m rows are live and contiguous.
    if (K > 0) {
      topIds.set(i32.subarray(2 * cap, 2 * cap + m * K));
      topLogprobs.set(f32.subarray(2 * cap + cap * K, 2 * cap + cap * K + m * K));
    }
    return { tokens: i32.slice(0, m), logprobs: f32.slice(cap, cap + m), topIds, topLogprobs };
  }

  /**
   * Sampling outputs (device, and `hostBlocks` (default 1: one per step of a multi-step
   * graph) copies in pinned host memory; `rows` (default capSeqs) rows of 2 + 2*numTop words)
   * and the sampler's scratch.
   */
  #ensureSampleBuffers(vocab: number, numTop: number, rows?: number, hostBlocks = 1): { out: Scratch; scratch: Scratch } {
    const cap = Math.max(rows ?? 0, this.#layout?.capacity.seqs ?? 1);
    const bytes = cap * (2 + 2 * numTop) * 4;
    const out = this.#ensureScratch("sample", bytes);
    const scratch = this.#ensureScratch("sampler", this.#ops.sampleScratchBytes(cap, vocab));
    if (!this.#sampleHost || hostBlocks * bytes > this.#sampleHost.bytes) {
      if (this.#capturing) throw new Error(`the sampling host buffer would have to grow to ${hostBlocks * bytes} bytes while capturing a CUDA graph; call reserve() first`);
      if (this.#sampleHost) {
        this.#dropGraphs(); // captured copies point at the old buffer
        this.#d.streamSynchronize(this.#stream);
        this.#d.memFreeHost(this.#sampleHost);
      }
      this.#sampleHost = this.#d.memAllocHost(Math.max(hostBlocks * bytes, 4096));
    }
    return { out, scratch };
  }

  // ------------------------------------------------------------------ graphs

  replay(key: string, forward: () => Tensor): Tensor {
    this.#enter();
    if (this.#capturing) throw new Error("replay() inside a capture");
    const cur = this.#current;
    if (!this.#graphsEnabled || !cur) return forward();
    const k = this.#graphKey(key, cur);
    try {
      const g = this.#graphs.get(k);
      if (g) {
        this.#launchGraph(g);
        return this.#retrack(g.out, cur);
      }
      // First time for this key: run eagerly (warms up plans and scratch, and is this
      // step's result), then record the same forward into a graph for later steps.
      const eager = this.#t(forward());
      this.#graphs.set(k, this.#capture(forward, eager));
      return eager;
    } catch (e) {
      this.#note(e);
      throw e;
    }
  }

  /**
   * `replay` and `sampleAsync` in one graph: the forward, the sampling and the copy of the
   * tokens to the host are one launch (two kernel launches and a copy fewer per step).
   */
  replaySample(key: string, forward: () => Tensor, step: PreparedStep): PendingSample {
    this.#enter();
    if (this.#capturing) throw new Error("replaySample() inside a capture");
    const p = this.#prep(step);
    if (!this.#graphsEnabled || p.batch.sampleRows.length === 0 || !this.#sampleInGraph) return this.sampleAsync(this.replay(key, forward), step);
    try {
      return this.#replaySampled(`${this.#graphKey(key, p)}|k${p.batch.sampling.numTopLogprobs}|sampled`, p, forward, false);
    } catch (e) {
      this.#note(e);
      throw e;
    }
  }

  /**
   * replaySample's graph, which also uploads the step's metadata when `upload` (prepare
   * then packed it without uploading): launched when `k` has one, else this step runs
   * eagerly and the same is captured.
   */
  #replaySampled(k: string, p: CudaPrepared, forward: () => Tensor, upload: boolean): PendingSample {
    const K = p.batch.sampling.numTopLogprobs, run = p.run;
    let g = this.#graphs.get(k);
    if (g) {
      this.#launchGraph(g);
      if (upload) this.#stagingBusy = "stream";
    } else {
      if (upload) this.#upload(p.packed.copyWords);
      const eager = this.#t(forward());
      this.#issueSample(eager, run, K); // this step's tokens
      const words = upload ? this.#graphUploadWords(p.packed) : 0;
      g = this.#capture(() => {
        if (upload) this.#d.memcpyHtoDAsyncPinned(this.#meta, this.#staging!.addr, words * 4, this.#stream);
        const out = this.#t(forward());
        this.#issueSample(out, run, K);
        return out;
      }, eager);
      this.#graphs.set(k, g);
    }
    this.#recordSampleEvent();
    return this.#pendingSample(p.batch.sampleRows.length, K, g.out.capRows);
  }

  /**
   * `n` decode steps in one graph (Backend.decodeSteps): each step's forward and sampling,
   * then (all but the last) advance_decode_step, which makes the next step's metadata from
   * the sampled tokens on the device, then the copy of the step's outputs to its own block
   * of the pinned host buffer. Launched when the key has a graph, else run eagerly and
   * captured; without graphs (INLAID_CUDA_GRAPHS=0, INLAID_SAMPLE_IN_GRAPH=0) issued eagerly.
   */
  decodeSteps(n: number, key: string, forward: (step: PreparedStep) => Tensor, step: PreparedStep, blockSize: number): PendingSteps {
    this.#enter();
    if (this.#capturing) throw new Error("decodeSteps() inside a capture");
    if (!Number.isInteger(n) || n < 1) throw new Error(`decodeSteps: n must be a positive integer (got ${n})`);
    const p = this.#prep(step);
    const b = p.batch, m = b.sampleRows.length;
    // advance_decode_step takes token row i as sequence i's, sampled as row i.
    if (!isDecodeOnly(b)) throw new Error("decodeSteps: the step is not decode-only (one token per sequence, row i sampled as i)");
    if (this.#kvBlockSize !== 0 && blockSize !== this.#kvBlockSize) {
      throw new Error(`decodeSteps: block size ${blockSize} differs from the KV cache's ${this.#kvBlockSize}`);
    }
    const K = b.sampling.numTopLogprobs, run = p.run;
    const issue = (): CudaTensor => {
      let out: CudaTensor | null = null;
      for (let j = 0; j < n; j++) {
        out = this.#t(forward(p));
        this.#issueSample(out, run, K, { block: j, blocks: n, advanceBlockSize: j < n - 1 ? blockSize : 0 });
      }
      return out!;
    };
    let cap: number;
    try {
      if (!this.#graphsEnabled || !this.#sampleInGraph) {
        cap = issue().capRows;
      } else {
        const k = `${this.#graphKey(key, p)}|k${K}|sampled|x${n}`;
        let g = this.#graphs.get(k);
        if (g) this.#launchGraph(g);
        else {
          const eager = issue();
          g = this.#capture(issue, eager);
          this.#graphs.set(k, g);
        }
        cap = g.out.capRows;
      }
      this.#recordSampleEvent();
    } catch (e) {
      this.#note(e);
      throw e;
    }
    const ticket = ++this.#sampleTicket;
    return {
      wait: (): readonly SampleResult[] => {
        this.#waitSample(ticket);
        return Array.from({ length: n }, (_, j) => this.#readSample(m, K, cap, j));
      },
    };
  }

  /**
   * `prepare` then `replaySample`, with the upload of the step's metadata inside the graph
   * as well: one copy and one event record fewer per decode step on the host. Present only
   * with INLAID_UPLOAD_IN_GRAPH=1 (experimental, not measured yet).
   */
  readonly prepareReplaySample?: (batch: StepBatch, key: string, forward: (step: PreparedStep) => Tensor) => { step: PreparedStep; pending: PendingSample };

  #prepareReplaySample(batch: StepBatch, key: string, forward: (step: PreparedStep) => Tensor): { step: PreparedStep; pending: PendingSample } {
    if (!this.#graphsEnabled || !this.#sampleInGraph || batch.sampleRows.length === 0) {
      const step = this.prepare(batch);
      return { step, pending: this.replaySample(key, () => forward(step), step) };
    }
    this.#enter();
    if (this.#capturing) throw new Error("prepareReplaySample() inside a capture");
    try {
      const p = this.#pack(batch);
      const k = `${this.#graphKey(key, p)}|k${batch.sampling.numTopLogprobs}|sampled|uploaded`;
      return { step: p, pending: this.#replaySampled(k, p, () => forward(p), true) };
    } catch (e) {
      this.#note(e);
      throw e;
    }
  }

  /** A graph's key: the caller's, and every bucket the captured launches depend on. */
  #graphKey(key: string, cur: CudaPrepared): string {
    const pk = cur.packed;
    // The all-slots LoRA shrink width follows the highest adapter slot in use (linearLora, linearQuantizedLora).
    return `${key}|t${pk.padTokens}|s${pk.padSeqs}|m${pk.padSample}|${pk.hasPrefill ? "P" : ""}${pk.hasDecode ? "D" : ""}` +
      `|l${loraSlotBucket(pk.loraSlotSpan)}`;
  }

  /** Who launches replayed graphs now: "host", or the device ("device" fire-and-forget, "tail"). */
  get graphLaunch(): "host" | "device" | "tail" {
    const m = this.#deviceLaunchOn ? this.#deviceLaunch?.mode : undefined;
    return m === undefined ? "host" : m === "tail" ? "tail" : "device";
  }

  #launchGraph(g: Graph): void {
    this.#d.graphLaunch(g.launcher ?? g.exec, this.#stream);
  }

  /** An executable graph, launched from the device when this backend can (else from the host). */
  #instantiate(graph: bigint): { exec: bigint; launcher: bigint | null } {
    const dl = this.#deviceLaunch;
    if (dl && this.#deviceLaunchOn) {
      try {
        return dl.instantiate(graph);
      } catch (e) {
        // Graphs set up before keep their launcher (and its module, freed at dispose).
        this.#deviceLaunchOn = false;
        process.emitWarning(`inlaid: graphs are launched from the host from now on: a graph could not be set up for device launch (${e instanceof Error ? e.message : String(e)})`);
      }
    }
    return { exec: this.#d.graphInstantiate(graph), launcher: null };
  }

  #capture(forward: () => Tensor, eager: CudaTensor): Graph {
    this.#d.streamBeginCapture(this.#stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
    this.#capturing = true;
    let out: CudaTensor;
    try {
      out = this.#t(forward());
    } catch (e) {
      this.#capturing = false;
      try {
        this.#d.graphDestroy(this.#d.streamEndCapture(this.#stream));
      } catch {
        // the capture was invalidated by the failure; the stream has left capture mode
      }
      throw e;
    }
    this.#capturing = false;
    const graph = this.#d.streamEndCapture(this.#stream);
    try {
      if (out.ptr !== eager.ptr || out.capRows !== eager.capRows) {
        throw new Error("replay(): forward returned a different tensor when captured than when run; it cannot be replayed");
      }
      return { ...this.#instantiate(graph), out, nodes: this.#d.graphNodeCount(graph) };
    } finally {
      this.#d.graphDestroy(graph);
    }
  }

  /** A replayed graph's output, viewed at the current step's row count. */
  #retrack(out: CudaTensor, cur: CudaPrepared): CudaTensor {
    if (!out.base || out.track === "fixed") return out;
    const n = out.track === "tokens" ? cur.batch.numTokens : cur.batch.sampleRows.length;
    if (n === out.rows) return out;
    return new CudaTensor(this, [n, ...out.shape.slice(1)], out.dtype, out.ptr, out.capRows, out.track, out.base);
  }

  /** Drops every captured graph (they are re-captured on next use). */
  invalidateGraphs(): void {
    this.#enter();
    if (this.#capturing) throw new Error("invalidateGraphs() while capturing a CUDA graph");
    this.#dropGraphs();
  }

  /** Captured graphs (for tests and diagnostics). */
  get graphCount(): number {
    return this.#graphs.size;
  }

  /** Nodes of each captured graph, by key (diagnostics: launch cost grows with them). */
  graphNodes(): Record<string, number> {
    return Object.fromEntries([...this.#graphs].map(([k, g]) => [k, g.nodes]));
  }

  // ------------------------------------------------------------------ diagnostics and teardown

  /** Kernel launches issued through the launcher so far. */
  get kernelLaunches(): number {
    return this.#launcher.launches;
  }

  /** The launcher (for tests that launch their own kernels). */
  get launcher(): KernelLauncher {
    return this.#launcher;
  }

  /** Waits for all issued work. */
  synchronize(): void {
    this.#enter();
    try {
      this.#d.streamSynchronize(this.#stream);
    } catch (e) {
      this.#note(e);
      throw e;
    }
  }

  /** Device milliseconds of the work `fn` issues (events around it; waits for completion). */
  timeMs(fn: () => void): number {
    this.#enter();
    const [a, b] = this.#timing;
    this.#d.eventRecord(a, this.#stream);
    fn();
    this.#d.eventRecord(b, this.#stream);
    this.#d.eventSynchronize(b);
    return this.#d.eventElapsedTime(a, b);
  }

  /** Frees everything this backend allocated and releases the device. Tensors become invalid. */
  dispose(): void {
    if (this.#disposed) return;
    const d = this.#d;
    quietly(() => d.ctxSetCurrent(this.#ctx));
    quietly(() => d.streamSynchronize(this.#stream));
    for (const g of this.#graphs.values()) {
      if (g.launcher !== null) quietly(() => d.graphExecDestroy(g.launcher!));
      quietly(() => d.graphExecDestroy(g.exec));
    }
    this.#graphs.clear();
    for (const t of this.#owned) {
      t.markFreed();
      quietly(() => d.memFree(t.ptr));
    }
    this.#owned.clear();
    for (const kv of this.#kvCaches) {
      kv.markFreed();
      quietly(() => d.memFree(kv.ptr));
    }
    this.#kvCaches.clear();
    for (const s of this.#loraStacks) {
      s.markFreed();
      quietly(() => d.memFree(s.ptr));
    }
    this.#loraStacks.clear();
    for (const q of this.#quantized) {
      q.markFreed();
      quietly(() => d.memFree(q.ptr));
    }
    this.#quantized.clear();
    for (const sc of this.#scratch.values()) quietly(() => d.memFree(sc.ptr));
    this.#scratch.clear();
    for (const p of [this.#meta, this.#workspace]) {
      if (p !== 0n) quietly(() => d.memFree(p));
    }
    if (this.#staging) quietly(() => d.memFreeHost(this.#staging!));
    if (this.#sampleHost) quietly(() => d.memFreeHost(this.#sampleHost!));
    quietly(() => this.#blas.dispose());
    quietly(() => this.#launcher.dispose());
    if (this.#deviceLaunch) quietly(() => this.#deviceLaunch!.dispose());
    quietly(() => d.eventDestroy(this.#stagingEvent));
    if (this.#sampleEvent !== 0n) quietly(() => d.eventDestroy(this.#sampleEvent));
    for (const e of this.#timing) quietly(() => d.eventDestroy(e));
    quietly(() => d.streamDestroy(this.#stream));
    quietly(() => d.primaryCtxRelease(d.device(this.#ordinal)));
    this.#disposed = true;
    if (CudaBackend.#active === this) CudaBackend.#active = null;
  }
}
