// The seam between the CUDA driver layer (ffi/, cuda_backend.ts) and the kernels
// (kernels/*.cu, ops.ts): ops.ts launches kernels by name through a Launcher and
// never touches FFI; the driver layer implements Launcher and never knows kernel math.

/** A device address (CUdeviceptr). */
export type DevicePtr = bigint;

export type Dim3 = readonly [number, number, number];

/** One kernel parameter, typed as the kernel declares it. */
export type KernelArg =
  | { readonly ptr: DevicePtr }
  | { readonly i32: number }
  | { readonly u32: number }
  | { readonly f32: number };

export interface Launcher {
  /** Launches `extern "C" __global__ name(args...)` on the backend's stream. Never blocks. */
  launch(name: string, grid: Dim3, block: Dim3, sharedBytes: number, args: readonly KernelArg[]): void;
}
