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
};

std::vector<DeviceInfo> list_devices();

}  // namespace tl
