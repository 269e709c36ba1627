// koffi bindings to the CUDA driver API (libcuda.so.1).
//
// Conventions that keep the hot paths cheap and the boundary safe:
// - Every CUresult goes through `#check`, the one place that turns a failing status
//   into a typed CudaError (with cuGetErrorName/String); nothing here aborts.
// - Device pointers and opaque handles (CUcontext, CUmodule, CUfunction, CUstream,
//   CUevent, CUgraph, CUgraphExec) are declared as uint64_t and held as bigint: on
//   x86-64 a pointer argument and a 64-bit integer argument travel the same way, and
//   koffi then never wraps or unwraps pointer objects per call.
// - Output parameters are preallocated typed arrays declared as `void *`: koffi passes
//   a typed array's own memory, so the callee writes straight into it (no per-call
//   marshalling objects).
// - Host buffers are passed as typed arrays (pageable memory) or, for pinned memory
//   from cuMemAllocHost, as raw addresses.
// - The versioned symbols (_v2) are bound explicitly; where CUDA renamed a symbol
//   between releases, `bind` takes the first one the installed driver exports.
//
// Opening the library happens on first use (`cudaDriver()`), never at import time.

import koffi from "koffi";
import { CudaError, CudaLoadError } from "./errors.js";
import { bind, openLibrary, type KoffiFn } from "./library.js";

export type CuPtr = bigint;
export type CuHandle = bigint;

// Values from cuda.h (CUDA 13.0), stable across releases.
export const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16;
export const CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38;
export const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;
export const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;
export const CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97;
export const CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8;
export const CU_STREAM_NON_BLOCKING = 0x1;
export const CU_EVENT_DEFAULT = 0x0;
export const CU_EVENT_DISABLE_TIMING = 0x2;
export const CU_STREAM_CAPTURE_MODE_GLOBAL = 0;
export const CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1;
export const CU_STREAM_CAPTURE_MODE_RELAXED = 2;
export const CU_STREAM_CAPTURE_STATUS_NONE = 0;
export const CU_STREAM_CAPTURE_STATUS_ACTIVE = 1;
export const CU_STREAM_CAPTURE_STATUS_INVALIDATED = 2;
const CU_STREAM_SET_CAPTURE_DEPENDENCIES = 1;
const CU_GRAPH_NODE_TYPE_KERNEL = 0;
/** CUgraphEdgeData (8 bytes: from_port, to_port, type, 5 reserved): a programmatic edge
 * (CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC = 1) from CU_GRAPH_KERNEL_NODE_PORT_LAUNCH_ORDER (2). */
const LAUNCH_ORDER_EDGE = [2, 0, 1, 0, 0, 0, 0, 0];
/** cuGraphInstantiateWithFlags: the executable graph may be launched from the device as well. */
export const CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH = 4n;
/** CUjitInputType for cuLinkAddData / cuLinkAddFile. */
export const CU_JIT_INPUT_CUBIN = 0;
export const CU_JIT_INPUT_LIBRARY = 4;

export const CUDA_SUCCESS = 0;
export const CUDA_ERROR_NO_DEVICE = 100;
export const CUDA_ERROR_NOT_FOUND = 500;
export const CUDA_ERROR_NOT_READY = 600;

/**
 * Errors after which the context is unusable (every later call fails the same way):
 * a kernel faulted. The backend remembers the first one and refuses further work.
 */
const STICKY = new Set([700, 702, 710, 714, 715, 716, 717, 718, 719]);
export function isStickyError(e: unknown): boolean {
  return e instanceof CudaError && e.library === "cuda" && STICKY.has(e.code);
}

/** Page-locked host memory: its address for async copies and an ArrayBuffer over it. */
export interface PinnedBuffer {
  readonly addr: CuPtr;
  readonly bytes: number;
  readonly buffer: ArrayBuffer;
  /** koffi's pointer object, for cuMemFreeHost. */
  readonly handle: unknown;
}

interface Fns {
  cuInit: KoffiFn;
  cuDriverGetVersion: KoffiFn;
  cuGetErrorName: KoffiFn;
  cuGetErrorString: KoffiFn;
  cuDeviceGetCount: KoffiFn;
  cuDeviceGet: KoffiFn;
  cuDeviceGetName: KoffiFn;
  cuDeviceGetAttribute: KoffiFn;
  cuDevicePrimaryCtxRetain: KoffiFn;
  cuDevicePrimaryCtxRelease: KoffiFn;
  cuCtxSetCurrent: KoffiFn;
  cuCtxSynchronize: KoffiFn;
  cuMemGetInfo: KoffiFn;
  cuMemAlloc: KoffiFn;
  cuMemFree: KoffiFn;
  cuMemAllocHost: KoffiFn;
  cuMemFreeHost: KoffiFn;
  cuMemcpyHtoD: KoffiFn;
  cuMemcpyDtoH: KoffiFn;
  cuMemcpyHtoDAsync: KoffiFn;
  cuMemcpyHtoDAsyncAddr: KoffiFn;
  cuMemcpyDtoHAsync: KoffiFn;
  cuMemcpyDtoHAsyncAddr: KoffiFn;
  cuMemcpyDtoDAsync: KoffiFn;
  cuMemsetD8: KoffiFn;
  cuMemsetD8Async: KoffiFn;
  cuMemsetD32Async: KoffiFn;
  cuModuleLoadData: KoffiFn;
  cuModuleUnload: KoffiFn;
  cuModuleGetFunction: KoffiFn;
  cuFuncSetAttribute: KoffiFn;
  cuFuncGetAttribute: KoffiFn;
  cuLaunchKernel: KoffiFn;
  cuLaunchKernelEx: KoffiFn;
  cuStreamCreate: KoffiFn;
  cuStreamDestroy: KoffiFn;
  cuStreamSynchronize: KoffiFn;
  cuStreamBeginCapture: KoffiFn;
  cuStreamEndCapture: KoffiFn;
  cuStreamIsCapturing: KoffiFn;
  cuGraphInstantiateWithFlags: KoffiFn;
  cuGraphLaunch: KoffiFn;
  cuGraphUpload: KoffiFn;
  cuLinkCreate: KoffiFn;
  cuLinkAddData: KoffiFn;
  cuLinkAddFile: KoffiFn;
  cuLinkComplete: KoffiFn;
  cuLinkDestroy: KoffiFn;
  cuGraphExecDestroy: KoffiFn;
  cuGraphDestroy: KoffiFn;
  cuGraphGetNodes: KoffiFn;
  cuGraphNodeGetType: KoffiFn;
  /** CUDA 12.3+ (dependencies with edge data); null where the driver lacks them. */
  cuStreamGetCaptureInfo: KoffiFn | null;
  cuStreamUpdateCaptureDependencies: KoffiFn | null;
  cuEventCreate: KoffiFn;
  cuEventRecord: KoffiFn;
  cuEventSynchronize: KoffiFn;
  cuEventQuery: KoffiFn;
  cuEventElapsedTime: KoffiFn;
  cuEventDestroy: KoffiFn;
}

function optional(bindIt: () => KoffiFn): KoffiFn | null {
  try {
    return bindIt();
  } catch {
    return null;
  }
}

function bindAll(lib: Parameters<typeof bind>[0]): Fns {
  const b = (what: string, ...protos: string[]): KoffiFn => bind(lib, what, ...protos);
  return {
    cuInit: b("cuInit", "int cuInit(unsigned int flags)"),
    cuDriverGetVersion: b("cuDriverGetVersion", "int cuDriverGetVersion(void *version)"),
    cuGetErrorName: b("cuGetErrorName", "int cuGetErrorName(int error, _Out_ const char **str)"),
    cuGetErrorString: b("cuGetErrorString", "int cuGetErrorString(int error, _Out_ const char **str)"),
    cuDeviceGetCount: b("cuDeviceGetCount", "int cuDeviceGetCount(void *count)"),
    cuDeviceGet: b("cuDeviceGet", "int cuDeviceGet(void *device, int ordinal)"),
    cuDeviceGetName: b("cuDeviceGetName", "int cuDeviceGetName(void *name, int len, int dev)"),
    cuDeviceGetAttribute: b("cuDeviceGetAttribute", "int cuDeviceGetAttribute(void *pi, int attrib, int dev)"),
    cuDevicePrimaryCtxRetain: b("cuDevicePrimaryCtxRetain", "int cuDevicePrimaryCtxRetain(void *pctx, int dev)"),
    cuDevicePrimaryCtxRelease: b("cuDevicePrimaryCtxRelease",
      "int cuDevicePrimaryCtxRelease_v2(int dev)", "int cuDevicePrimaryCtxRelease(int dev)"),
    cuCtxSetCurrent: b("cuCtxSetCurrent", "int cuCtxSetCurrent(uint64_t ctx)"),
    cuCtxSynchronize: b("cuCtxSynchronize", "int cuCtxSynchronize()"),
    cuMemGetInfo: b("cuMemGetInfo", "int cuMemGetInfo_v2(void *free, void *total)"),
    cuMemAlloc: b("cuMemAlloc", "int cuMemAlloc_v2(void *dptr, size_t bytes)"),
    cuMemFree: b("cuMemFree", "int cuMemFree_v2(uint64_t dptr)"),
    cuMemAllocHost: b("cuMemAllocHost", "int cuMemAllocHost_v2(_Out_ void **pp, size_t bytes)"),
    cuMemFreeHost: b("cuMemFreeHost", "int cuMemFreeHost(void *p)"),
    cuMemcpyHtoD: b("cuMemcpyHtoD", "int cuMemcpyHtoD_v2(uint64_t dst, const void *src, size_t bytes)"),
    cuMemcpyDtoH: b("cuMemcpyDtoH", "int cuMemcpyDtoH_v2(void *dst, uint64_t src, size_t bytes)"),
    cuMemcpyHtoDAsync: b("cuMemcpyHtoDAsync",
      "int cuMemcpyHtoDAsync_v2(uint64_t dst, const void *src, size_t bytes, uint64_t stream)"),
    // Same symbol, source given as a raw (pinned) host address.
    cuMemcpyHtoDAsyncAddr: b("cuMemcpyHtoDAsync",
      "int cuMemcpyHtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, uint64_t stream)"),
    cuMemcpyDtoHAsync: b("cuMemcpyDtoHAsync",
      "int cuMemcpyDtoHAsync_v2(void *dst, uint64_t src, size_t bytes, uint64_t stream)"),
    cuMemcpyDtoHAsyncAddr: b("cuMemcpyDtoHAsync",
      "int cuMemcpyDtoHAsync_v2(uint64_t dst, uint64_t src, size_t bytes, uint64_t stream)"),
    cuMemcpyDtoDAsync: b("cuMemcpyDtoDAsync",
      "int cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, uint64_t stream)"),
    cuMemsetD8: b("cuMemsetD8", "int cuMemsetD8_v2(uint64_t dst, uint8_t value, size_t n)"),
    cuMemsetD8Async: b("cuMemsetD8Async", "int cuMemsetD8Async(uint64_t dst, uint8_t value, size_t n, uint64_t stream)"),
    cuMemsetD32Async: b("cuMemsetD32Async", "int cuMemsetD32Async(uint64_t dst, uint32_t value, size_t n, uint64_t stream)"),
    cuModuleLoadData: b("cuModuleLoadData", "int cuModuleLoadData(void *module, const void *image)"),
    cuModuleUnload: b("cuModuleUnload", "int cuModuleUnload(uint64_t module)"),
    cuModuleGetFunction: b("cuModuleGetFunction", "int cuModuleGetFunction(void *fn, uint64_t module, const char *name)"),
    cuFuncSetAttribute: b("cuFuncSetAttribute", "int cuFuncSetAttribute(uint64_t fn, int attrib, int value)"),
    cuFuncGetAttribute: b("cuFuncGetAttribute", "int cuFuncGetAttribute(void *pi, int attrib, uint64_t fn)"),
    cuLaunchKernel: b("cuLaunchKernel",
      "int cuLaunchKernel(uint64_t fn, uint32_t gx, uint32_t gy, uint32_t gz, uint32_t bx, uint32_t by, uint32_t bz, " +
        "uint32_t sharedBytes, uint64_t stream, uint64_t kernelParams, uint64_t extra)"),
    cuLaunchKernelEx: b("cuLaunchKernelEx", "int cuLaunchKernelEx(uint64_t config, uint64_t fn, uint64_t kernelParams, uint64_t extra)"),
    cuStreamCreate: b("cuStreamCreate", "int cuStreamCreate(void *stream, uint32_t flags)"),
    cuStreamDestroy: b("cuStreamDestroy", "int cuStreamDestroy_v2(uint64_t stream)", "int cuStreamDestroy(uint64_t stream)"),
    cuStreamSynchronize: b("cuStreamSynchronize", "int cuStreamSynchronize(uint64_t stream)"),
    cuStreamBeginCapture: b("cuStreamBeginCapture", "int cuStreamBeginCapture_v2(uint64_t stream, int mode)"),
    cuStreamEndCapture: b("cuStreamEndCapture", "int cuStreamEndCapture(uint64_t stream, void *graph)"),
    cuStreamIsCapturing: b("cuStreamIsCapturing", "int cuStreamIsCapturing(uint64_t stream, void *status)"),
    cuGraphInstantiateWithFlags: b("cuGraphInstantiateWithFlags",
      "int cuGraphInstantiateWithFlags(void *exec, uint64_t graph, uint64_t flags)"),
    cuGraphLaunch: b("cuGraphLaunch", "int cuGraphLaunch(uint64_t exec, uint64_t stream)"),
    cuGraphUpload: b("cuGraphUpload", "int cuGraphUpload(uint64_t exec, uint64_t stream)"),
    cuLinkCreate: b("cuLinkCreate", "int cuLinkCreate_v2(uint32_t numOptions, void *options, void *optionValues, void *stateOut)"),
    cuLinkAddData: b("cuLinkAddData",
      "int cuLinkAddData_v2(uint64_t state, int type, const void *data, size_t size, const char *name, uint32_t numOptions, void *options, void *optionValues)"),
    cuLinkAddFile: b("cuLinkAddFile",
      "int cuLinkAddFile_v2(uint64_t state, int type, const char *path, uint32_t numOptions, void *options, void *optionValues)"),
    cuLinkComplete: b("cuLinkComplete", "int cuLinkComplete(uint64_t state, _Out_ void **cubinOut, void *sizeOut)"),
    cuLinkDestroy: b("cuLinkDestroy", "int cuLinkDestroy(uint64_t state)"),
    cuGraphExecDestroy: b("cuGraphExecDestroy", "int cuGraphExecDestroy(uint64_t exec)"),
    cuGraphDestroy: b("cuGraphDestroy", "int cuGraphDestroy(uint64_t graph)"),
    cuGraphGetNodes: b("cuGraphGetNodes", "int cuGraphGetNodes(uint64_t graph, void *nodes, void *numNodes)"),
    cuGraphNodeGetType: b("cuGraphNodeGetType", "int cuGraphNodeGetType(uint64_t node, void *type)"),
    cuStreamGetCaptureInfo: optional(() => b("cuStreamGetCaptureInfo",
      "int cuStreamGetCaptureInfo_v3(uint64_t stream, void *status, void *id, void *graph, _Out_ void **deps, _Out_ void **edgeData, void *num)")),
    cuStreamUpdateCaptureDependencies: optional(() => b("cuStreamUpdateCaptureDependencies",
      "int cuStreamUpdateCaptureDependencies_v2(uint64_t stream, void *deps, void *edgeData, size_t num, uint32_t flags)")),
    cuEventCreate: b("cuEventCreate", "int cuEventCreate(void *event, uint32_t flags)"),
    cuEventRecord: b("cuEventRecord", "int cuEventRecord(uint64_t event, uint64_t stream)"),
    cuEventSynchronize: b("cuEventSynchronize", "int cuEventSynchronize(uint64_t event)"),
    cuEventQuery: b("cuEventQuery", "int cuEventQuery(uint64_t event)"),
    cuEventElapsedTime: b("cuEventElapsedTime",
      "int cuEventElapsedTime_v2(void *ms, uint64_t start, uint64_t end)", "int cuEventElapsedTime(void *ms, uint64_t start, uint64_t end)"),
    cuEventDestroy: b("cuEventDestroy", "int cuEventDestroy_v2(uint64_t event)", "int cuEventDestroy(uint64_t event)"),
  };
}

export class CudaDriver {
  readonly path: string;
  readonly #f: Fns;
  // Output slots, reused by every call (calls are synchronous and never re-entrant).
  readonly #u64 = new BigUint64Array(1);
  readonly #u64b = new BigUint64Array(1);
  readonly #u64c = new BigUint64Array(1);
  readonly #edge = new Uint8Array(8);
  readonly #i32 = new Int32Array(1);
  readonly #f32 = new Float32Array(1);
  readonly #strOut: (string | null)[] = [null];

  private constructor(path: string, fns: Fns) {
    this.path = path;
    this.#f = fns;
  }

  /** Opens libcuda and calls cuInit. Throws CudaLoadError or CudaError. */
  static open(): CudaDriver {
    const { lib, path } = openLibrary(
      "libcuda.so.1 (the NVIDIA driver)",
      ["libcuda.so.1", "libcuda.so"],
      ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib64", "/usr/lib/wsl/lib", "/usr/local/cuda/compat"],
      process.env.INLAID_LIBCUDA,
    );
    const d = new CudaDriver(path, bindAll(lib));
    d.#check("cuInit", d.#f.cuInit(0));
    return d;
  }

  // ------------------------------------------------------------------ errors

  /** The one place a CUresult becomes an exception. */
  #check(call: string, rc: number, context?: string): void {
    if (rc !== CUDA_SUCCESS) throw this.error(call, rc, context);
  }

  error(call: string, rc: number, context?: string): CudaError {
    let name = `CUresult ${rc}`;
    let desc = "unknown error";
    try {
      if (this.#f.cuGetErrorName(rc, this.#strOut) === 0 && this.#strOut[0]) name = this.#strOut[0];
      if (this.#f.cuGetErrorString(rc, this.#strOut) === 0 && this.#strOut[0]) desc = this.#strOut[0];
    } catch {
      // keep the numeric code
    }
    return new CudaError("cuda", call, rc, name, desc, context);
  }

  // ------------------------------------------------------------------ devices and contexts

  driverVersion(): number {
    this.#check("cuDriverGetVersion", this.#f.cuDriverGetVersion(this.#i32));
    return this.#i32[0]!;
  }

  deviceCount(): number {
    this.#check("cuDeviceGetCount", this.#f.cuDeviceGetCount(this.#i32));
    return this.#i32[0]!;
  }

  device(ordinal: number): number {
    this.#check("cuDeviceGet", this.#f.cuDeviceGet(this.#i32, ordinal), `ordinal ${ordinal}`);
    return this.#i32[0]!;
  }

  deviceName(dev: number): string {
    const buf = new Uint8Array(256);
    this.#check("cuDeviceGetName", this.#f.cuDeviceGetName(buf, buf.length, dev));
    const end = buf.indexOf(0);
    return Buffer.from(buf.subarray(0, end < 0 ? buf.length : end)).toString("utf8");
  }

  deviceAttribute(attrib: number, dev: number): number {
    this.#check("cuDeviceGetAttribute", this.#f.cuDeviceGetAttribute(this.#i32, attrib, dev), `attribute ${attrib}`);
    return this.#i32[0]!;
  }

  primaryCtxRetain(dev: number): CuHandle {
    this.#check("cuDevicePrimaryCtxRetain", this.#f.cuDevicePrimaryCtxRetain(this.#u64, dev));
    return this.#u64[0]!;
  }

  primaryCtxRelease(dev: number): void {
    this.#check("cuDevicePrimaryCtxRelease_v2", this.#f.cuDevicePrimaryCtxRelease(dev));
  }

  ctxSetCurrent(ctx: CuHandle): void {
    this.#check("cuCtxSetCurrent", this.#f.cuCtxSetCurrent(ctx));
  }

  ctxSynchronize(): void {
    this.#check("cuCtxSynchronize", this.#f.cuCtxSynchronize());
  }

  // ------------------------------------------------------------------ memory

  memGetInfo(): { free: number; total: number } {
    this.#check("cuMemGetInfo_v2", this.#f.cuMemGetInfo(this.#u64, this.#u64b));
    return { free: Number(this.#u64[0]!), total: Number(this.#u64b[0]!) };
  }

  memAlloc(bytes: number): CuPtr {
    // cuMemAlloc rejects 0 bytes; a 1-byte allocation keeps empty tensors valid handles.
    this.#check("cuMemAlloc_v2", this.#f.cuMemAlloc(this.#u64, Math.max(1, bytes)), `${bytes} bytes`);
    return this.#u64[0]!;
  }

  memFree(ptr: CuPtr): void {
    this.#check("cuMemFree_v2", this.#f.cuMemFree(ptr));
  }

  memAllocHost(bytes: number): PinnedBuffer {
    const out: unknown[] = [null];
    this.#check("cuMemAllocHost_v2", this.#f.cuMemAllocHost(out, bytes), `${bytes} bytes`);
    const handle = out[0];
    return { addr: koffi.address(handle), bytes, buffer: koffi.view(handle, bytes), handle };
  }

  memFreeHost(p: PinnedBuffer): void {
    this.#check("cuMemFreeHost", this.#f.cuMemFreeHost(p.handle));
  }

  /** Synchronous copy (NULL stream). Only for code that runs before any stream work. */
  memcpyHtoD(dst: CuPtr, src: ArrayBufferView, bytes: number): void {
    this.#check("cuMemcpyHtoD_v2", this.#f.cuMemcpyHtoD(dst, src, bytes), `${bytes} bytes`);
  }

  memcpyDtoH(dst: ArrayBufferView, src: CuPtr, bytes: number): void {
    this.#check("cuMemcpyDtoH_v2", this.#f.cuMemcpyDtoH(dst, src, bytes), `${bytes} bytes`);
  }

  /**
   * Host (pageable typed array) to device, ordered on `stream`. For pageable memory
   * the driver stages the source before returning, so `src` may be reused at once.
   */
  memcpyHtoDAsync(dst: CuPtr, src: ArrayBufferView, bytes: number, stream: CuHandle): void {
    this.#check("cuMemcpyHtoDAsync_v2", this.#f.cuMemcpyHtoDAsync(dst, src, bytes, stream), `${bytes} bytes`);
  }

  /** Pinned host address to device; truly asynchronous: keep the source intact until the stream passes it. */
  memcpyHtoDAsyncPinned(dst: CuPtr, src: CuPtr, bytes: number, stream: CuHandle): void {
    this.#check("cuMemcpyHtoDAsync_v2", this.#f.cuMemcpyHtoDAsyncAddr(dst, src, bytes, stream), `${bytes} bytes`);
  }

  memcpyDtoHAsync(dst: ArrayBufferView, src: CuPtr, bytes: number, stream: CuHandle): void {
    this.#check("cuMemcpyDtoHAsync_v2", this.#f.cuMemcpyDtoHAsync(dst, src, bytes, stream), `${bytes} bytes`);
  }

  memcpyDtoHAsyncPinned(dst: CuPtr, src: CuPtr, bytes: number, stream: CuHandle): void {
    this.#check("cuMemcpyDtoHAsync_v2", this.#f.cuMemcpyDtoHAsyncAddr(dst, src, bytes, stream), `${bytes} bytes`);
  }

  memcpyDtoDAsync(dst: CuPtr, src: CuPtr, bytes: number, stream: CuHandle): void {
    this.#check("cuMemcpyDtoDAsync_v2", this.#f.cuMemcpyDtoDAsync(dst, src, bytes, stream), `${bytes} bytes`);
  }

  memsetD8(dst: CuPtr, value: number, n: number): void {
    this.#check("cuMemsetD8_v2", this.#f.cuMemsetD8(dst, value, n));
  }

  memsetD8Async(dst: CuPtr, value: number, n: number, stream: CuHandle): void {
    this.#check("cuMemsetD8Async", this.#f.cuMemsetD8Async(dst, value, n, stream));
  }

  memsetD32Async(dst: CuPtr, value: number, n: number, stream: CuHandle): void {
    this.#check("cuMemsetD32Async", this.#f.cuMemsetD32Async(dst, value >>> 0, n, stream));
  }

  // ------------------------------------------------------------------ modules and kernels

  moduleLoadData(image: Uint8Array, what: string): CuHandle {
    this.#check("cuModuleLoadData", this.#f.cuModuleLoadData(this.#u64, image), what);
    return this.#u64[0]!;
  }

  moduleUnload(mod: CuHandle): void {
    this.#check("cuModuleUnload", this.#f.cuModuleUnload(mod));
  }

  /** The kernel `name` in `mod`, or null when the module has no such function. */
  moduleGetFunction(mod: CuHandle, name: string): CuHandle | null {
    const rc = this.#f.cuModuleGetFunction(this.#u64, mod, name) as number;
    if (rc === CUDA_ERROR_NOT_FOUND) return null;
    this.#check("cuModuleGetFunction", rc, name);
    return this.#u64[0]!;
  }

  funcSetAttribute(fn: CuHandle, attrib: number, value: number, what: string): void {
    this.#check("cuFuncSetAttribute", this.#f.cuFuncSetAttribute(fn, attrib, value), what);
  }

  funcGetAttribute(fn: CuHandle, attrib: number): number {
    this.#check("cuFuncGetAttribute", this.#f.cuFuncGetAttribute(this.#i32, attrib, fn));
    return this.#i32[0]!;
  }

  /**
   * `kernelParams` is the address of a native `void*[]` whose entries point at each
   * argument's value (see KernelLauncher); the driver copies the values during the call.
   */
  launchKernel(
    fn: CuHandle, gx: number, gy: number, gz: number, bx: number, by: number, bz: number,
    sharedBytes: number, stream: CuHandle, kernelParams: CuPtr, what: string,
  ): void {
    const rc = this.#f.cuLaunchKernel(fn, gx, gy, gz, bx, by, bz, sharedBytes, stream, kernelParams, 0n) as number;
    if (rc !== CUDA_SUCCESS) {
      throw this.error("cuLaunchKernel", rc, `${what} grid [${gx}, ${gy}, ${gz}] block [${bx}, ${by}, ${bz}] shared ${sharedBytes}`);
    }
  }

  /** cuLaunchKernelEx: `config` is the address of a native CUlaunchConfig (launcher.ts builds it). */
  launchKernelEx(config: CuPtr, fn: CuHandle, kernelParams: CuPtr, what: string): void {
    const rc = this.#f.cuLaunchKernelEx(config, fn, kernelParams, 0n) as number;
    if (rc !== CUDA_SUCCESS) throw this.error("cuLaunchKernelEx", rc, what);
  }

  // ------------------------------------------------------------------ streams, graphs, events

  streamCreate(flags: number): CuHandle {
    this.#check("cuStreamCreate", this.#f.cuStreamCreate(this.#u64, flags));
    return this.#u64[0]!;
  }

  streamDestroy(stream: CuHandle): void {
    this.#check("cuStreamDestroy_v2", this.#f.cuStreamDestroy(stream));
  }

  streamSynchronize(stream: CuHandle): void {
    this.#check("cuStreamSynchronize", this.#f.cuStreamSynchronize(stream));
  }

  streamBeginCapture(stream: CuHandle, mode: number): void {
    this.#check("cuStreamBeginCapture_v2", this.#f.cuStreamBeginCapture(stream, mode));
  }

  /** Ends a capture. Returns the graph, or throws (the stream has left capture mode either way). */
  streamEndCapture(stream: CuHandle): CuHandle {
    this.#u64[0] = 0n;
    const rc = this.#f.cuStreamEndCapture(stream, this.#u64) as number;
    const graph = this.#u64[0]!;
    if (rc !== CUDA_SUCCESS) {
      if (graph !== 0n) this.#f.cuGraphDestroy(graph);
      throw this.error("cuStreamEndCapture", rc);
    }
    return graph;
  }

  /**
   * While `stream` is capturing and the next captured node would depend on one kernel node
   * only, by an ordinary edge: makes that edge programmatic from the kernel's launch-order
   * port, so the next kernel may launch once every block of that one has begun (it must
   * griddepcontrol.wait before touching what that one writes; the wait still covers its
   * completion). Returns whether it did: false when not capturing, for another dependency
   * set, or on a driver without the CUDA 12.3 capture calls.
   */
  captureDependOnLaunchOrder(stream: CuHandle): boolean {
    const info = this.#f.cuStreamGetCaptureInfo, update = this.#f.cuStreamUpdateCaptureDependencies;
    if (!info || !update) return false;
    const deps: unknown[] = [null], edges: unknown[] = [null];
    this.#u64c[0] = 0n;
    this.#check("cuStreamGetCaptureInfo_v3", info(stream, this.#i32, this.#u64, this.#u64b, deps, edges, this.#u64c));
    if (this.#i32[0] !== CU_STREAM_CAPTURE_STATUS_ACTIVE || this.#u64c[0] !== 1n || !deps[0]) return false;
    if (edges[0]) {
      const e = koffi.decode(edges[0], "uint8_t", 8) as number[];
      if (e[0] !== 0 || e[2] !== 0) return false;
    }
    const node = BigInt(koffi.decode(deps[0], "uint64_t") as bigint | number);
    const type = new Int32Array(1);
    this.#check("cuGraphNodeGetType", this.#f.cuGraphNodeGetType(node, type));
    if (type[0] !== CU_GRAPH_NODE_TYPE_KERNEL) return false;
    this.#u64c[0] = node;
    this.#edge.set(LAUNCH_ORDER_EDGE);
    this.#check("cuStreamUpdateCaptureDependencies_v2", update(stream, this.#u64c, this.#edge, 1, CU_STREAM_SET_CAPTURE_DEPENDENCIES));
    return true;
  }

  streamCaptureStatus(stream: CuHandle): number {
    this.#check("cuStreamIsCapturing", this.#f.cuStreamIsCapturing(stream, this.#i32));
    return this.#i32[0]!;
  }

  graphInstantiate(graph: CuHandle, flags = 0n): CuHandle {
    this.#check("cuGraphInstantiateWithFlags", this.#f.cuGraphInstantiateWithFlags(this.#u64, graph, flags));
    return this.#u64[0]!;
  }

  /** Makes a graph's device-side resources ready on `stream` (needed before a device launch). */
  graphUpload(exec: CuHandle, stream: CuHandle): void {
    this.#check("cuGraphUpload", this.#f.cuGraphUpload(exec, stream));
  }

  /**
   * Links a relocatable CUBIN (NVRTC -rdc=true) with a device library (an .a such as
   * libcudadevrt.a) into a loadable CUBIN, with the driver's JIT linker.
   */
  linkWithLibrary(cubin: Uint8Array, name: string, libraryPath: string): Uint8Array {
    this.#check("cuLinkCreate_v2", this.#f.cuLinkCreate(0, null, null, this.#u64));
    const state = this.#u64[0]!;
    try {
      this.#check("cuLinkAddData_v2", this.#f.cuLinkAddData(state, CU_JIT_INPUT_CUBIN, cubin, cubin.byteLength, name, 0, null, null), name);
      this.#check("cuLinkAddFile_v2", this.#f.cuLinkAddFile(state, CU_JIT_INPUT_LIBRARY, libraryPath, 0, null, null), libraryPath);
      const out: unknown[] = [null];
      this.#u64b[0] = 0n;
      this.#check("cuLinkComplete", this.#f.cuLinkComplete(state, out, this.#u64b), name);
      // The image belongs to the link state: copy it before destroying that.
      return new Uint8Array(koffi.view(out[0], Number(this.#u64b[0]!))).slice();
    } finally {
      this.#f.cuLinkDestroy(state);
    }
  }

  /** Nodes in a (captured) graph: what its launch's host cost grows with. */
  graphNodeCount(graph: CuHandle): number {
    this.#u64[0] = 0n;
    this.#check("cuGraphGetNodes", this.#f.cuGraphGetNodes(graph, null, this.#u64));
    return Number(this.#u64[0]!);
  }

  graphLaunch(exec: CuHandle, stream: CuHandle): void {
    this.#check("cuGraphLaunch", this.#f.cuGraphLaunch(exec, stream));
  }

  graphExecDestroy(exec: CuHandle): void {
    this.#check("cuGraphExecDestroy", this.#f.cuGraphExecDestroy(exec));
  }

  graphDestroy(graph: CuHandle): void {
    this.#check("cuGraphDestroy", this.#f.cuGraphDestroy(graph));
  }

  eventCreate(flags: number): CuHandle {
    this.#check("cuEventCreate", this.#f.cuEventCreate(this.#u64, flags));
    return this.#u64[0]!;
  }

  eventRecord(event: CuHandle, stream: CuHandle): void {
    this.#check("cuEventRecord", this.#f.cuEventRecord(event, stream));
  }

  eventSynchronize(event: CuHandle): void {
    this.#check("cuEventSynchronize", this.#f.cuEventSynchronize(event));
  }

  /** True once all work before the event's record has completed. */
  eventQuery(event: CuHandle): boolean {
    const rc = this.#f.cuEventQuery(event) as number;
    if (rc === CUDA_ERROR_NOT_READY) return false;
    this.#check("cuEventQuery", rc);
    return true;
  }

  /** Milliseconds between two recorded (and completed) events. */
  eventElapsedTime(start: CuHandle, end: CuHandle): number {
    this.#check("cuEventElapsedTime", this.#f.cuEventElapsedTime(this.#f32, start, end));
    return this.#f32[0]!;
  }

  eventDestroy(event: CuHandle): void {
    this.#check("cuEventDestroy_v2", this.#f.cuEventDestroy(event));
  }
}

let opened: { driver: CudaDriver } | { error: Error } | null = null;

/** The process-wide driver binding, opened (and cuInit called) on first use. */
export function cudaDriver(): CudaDriver {
  if (!opened) {
    try {
      opened = { driver: CudaDriver.open() };
    } catch (e) {
      opened = { error: e instanceof Error ? e : new Error(String(e)) };
    }
  }
  if ("error" in opened) throw opened.error;
  return opened.driver;
}

/** Why no CUDA device is usable, or null when one is. Never throws. */
export function cudaUnavailableReason(): string | null {
  try {
    const d = cudaDriver();
    const n = d.deviceCount();
    return n > 0 ? null : "the NVIDIA driver reports no CUDA device";
  } catch (e) {
    if (e instanceof CudaError && e.code === CUDA_ERROR_NO_DEVICE) return "the NVIDIA driver reports no CUDA device";
    if (e instanceof CudaLoadError) return e.message;
    return e instanceof Error ? e.message : String(e);
  }
}
