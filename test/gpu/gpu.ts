// Whether this machine can run the GPU suite; each GPU test file skips with this reason otherwise.
import { existsSync } from "node:fs";

const libcuda = ["/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib64/libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1"];
export const HAS_GPU = process.env.INLAID_FORCE_GPU_TESTS === "1" || libcuda.some((p) => existsSync(p)) || existsSync("/dev/nvidia0");
export const NO_GPU_REASON = "no NVIDIA GPU on this machine (libcuda.so.1 / /dev/nvidia0 not found)";
