// Kernel launches with launch attributes the <<<>>> syntax cannot express.
#pragma once
#include <cuda_runtime.h>

namespace hoptune {

// Launch with programmatic dependent launch allowed: the kernel may be scheduled while the
// previous kernel in the stream drains (once that kernel's CTAs have all run
// griddepcontrol.launch_dependents or exited), and must run griddepcontrol.wait before it reads
// memory that kernel writes.
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

}  // namespace hoptune
