// Launches a step's graph from the GPU (device_graph.ts says why). Compiled relocatable
// (-rdc=true) and linked with the CUDA device runtime (libcudadevrt.a), which
// implements the device-side cudaGraphLaunch.
//
//   graph_launch(exec, how): cudaGraphLaunch(exec, how), one thread.
//     exec  a CUgraphExec instantiated with CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH and uploaded
//     how   the launch "stream": cudaStreamGraphFireAndForget (0x02 << 56) or
//           cudaStreamGraphTailLaunch (0x01 << 56), cuda_device_runtime_api.h's values

extern "C" __global__ void graph_launch(unsigned long long exec, unsigned long long how) {
  cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(exec), reinterpret_cast<cudaStream_t>(how));
}
