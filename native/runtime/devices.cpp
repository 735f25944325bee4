// Device discovery: CPU, CUDA (name and memory through the driver API, so no CUDA headers are needed), MPS.
#include "runtime/devices.h"

#include <dlfcn.h>
#include <unistd.h>

#include <fstream>
#include <torch/torch.h>

namespace tl {
namespace {

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto p = line.find(':');
      if (p != std::string::npos) return line.substr(p + 2);
    }
  }
  return "unknown CPU";
}

// The CUDA driver API is a stable C ABI: dlopen it instead of compiling against a toolkit.
struct CudaDriver {
  using GetName = int (*)(char*, int, int);
  using TotalMem = int (*)(size_t*, int);
  using GetAttribute = int (*)(int*, int, int);
  void* lib = nullptr;
  GetName get_name = nullptr;
  TotalMem total_mem = nullptr;
  GetAttribute get_attribute = nullptr;
  static constexpr int kComputeCapabilityMajor = 75, kComputeCapabilityMinor = 76;  // CUdevice_attribute
  CudaDriver() {
    lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) return;
    get_name = reinterpret_cast<GetName>(dlsym(lib, "cuDeviceGetName"));
    total_mem = reinterpret_cast<TotalMem>(dlsym(lib, "cuDeviceTotalMem_v2"));
    get_attribute = reinterpret_cast<GetAttribute>(dlsym(lib, "cuDeviceGetAttribute"));
  }
};

}  // namespace

std::vector<DeviceInfo> list_devices() {
  std::vector<DeviceInfo> out;
  DeviceInfo cpu;
  cpu.type = "cpu";
  cpu.index = 0;
  cpu.available = true;
  cpu.name = cpu_model();
  cpu.total_memory = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
  cpu.threads = at::get_num_threads();
  cpu.bf16 = true;
  out.push_back(cpu);

#ifdef TRAIN_LORA_CUDA
  const bool cuda_built = true;
#else
  const bool cuda_built = false;
#endif
  if (torch::cuda::is_available()) {
    CudaDriver drv;
    int n = static_cast<int>(torch::cuda::device_count());
    for (int i = 0; i < n; ++i) {
      DeviceInfo d;
      d.type = "cuda";
      d.index = i;
      d.available = true;
      char name[256] = {0};
      if (drv.get_name && drv.get_name(name, sizeof name, i) == 0) d.name = name;
      else d.name = "CUDA device " + std::to_string(i);
      size_t total = 0;
      if (drv.total_mem && drv.total_mem(&total, i) == 0) d.total_memory = static_cast<double>(total);
      int major = 0, minor = 0;
      if (drv.get_attribute && drv.get_attribute(&major, CudaDriver::kComputeCapabilityMajor, i) == 0 &&
          drv.get_attribute(&minor, CudaDriver::kComputeCapabilityMinor, i) == 0) {
        d.compute_capability = std::to_string(major) + "." + std::to_string(minor);
        d.bf16 = major >= 8;  // Ampere and newer: bf16 tensor cores
      }
      out.push_back(d);
    }
  } else {
    DeviceInfo d;
    d.type = "cuda";
    d.available = false;
    d.reason = cuda_built ? "libtorch has CUDA, but no CUDA device or driver was found"
                          : "this libtorch build has no CUDA backend (a CPU build); point LIBTORCH at a CUDA build of "
                            "torch and run `npm run build:native`";
    out.push_back(d);
  }

  DeviceInfo mps;
  mps.type = "mps";
  mps.available = at::hasMPS();
#ifdef __APPLE__
  if (!mps.available) mps.reason = "this libtorch build or this Mac has no Metal (MPS) support";
#else
  if (!mps.available) mps.reason = "MPS (Apple Metal) exists only on macOS";
#endif
  if (mps.available) mps.name = "Apple MPS";
  out.push_back(mps);
  return out;
}

MathMode set_allow_tf32(bool allow) {
  auto& ctx = at::globalContext();
  ctx.setAllowTF32CuBLAS(allow);
  ctx.setAllowTF32CuDNN(allow);
  return {ctx.allowTF32CuBLAS(), ctx.allowTF32CuDNN()};
}

}  // namespace tl
