#pragma once
#include <string>
#include <vector>

namespace tl {

struct DeviceInfo {
  std::string type;  // cpu | cuda | mps
  int index = 0;
  bool available = false;
  std::string name;
  std::string reason;        // why not available
  double total_memory = 0;   // bytes, 0 when unknown
  int threads = 0;           // CPU: intra-op threads
  std::string compute_capability;  // CUDA: "8.0", ...
  bool bf16 = false;         // bf16 autocast is supported and fast (CPU: supported; CUDA: compute capability >= 8.0)
};

// TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN): both set to `allow` (libtorch's default allows it in
// cuDNN only); returns what libtorch reports afterwards. Off gives fp32 results that match a CPU reference.
struct MathMode {
  bool tf32_cublas = false, tf32_cudnn = false;
};
MathMode set_allow_tf32(bool allow);

std::vector<DeviceInfo> list_devices();

}  // namespace tl
