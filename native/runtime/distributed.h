// Data-parallel training with libtorch's own c10d: a TCPStore rendezvous (rank 0 hosts it), then
// ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA builds that found nccl.h). Everything here runs on the engine's
// torch thread; c10d and gloo headers stay inside distributed.cpp (see CMakeLists.txt).
#pragma once
#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace tl {

struct DistOptions {
  std::string backend = "gloo";  // gloo | nccl
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  int rank = 0;
  int world_size = 1;
  // The training device ("cuda:LOCAL_RANK" with nccl): where small all-reduces run.
  std::string device = "cpu";
  // Rendezvous and every collective fail after this long instead of hanging.
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
  // Gradient buckets (DDP's bucket_cap_mb default: 25 MB).
  int64_t bucket_bytes = 25ll << 20;
};

// Which backends this build can create ("gloo", and "nccl" in CUDA builds with nccl.h).
std::vector<std::string> dist_backends();

class ProcessGroup {
 public:
  // Joins the group: blocks until all world_size ranks have connected, or throws UserError EDIST after the timeout.
  explicit ProcessGroup(const DistOptions& o);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return opts_.rank; }
  int world_size() const { return opts_.world_size; }
  const DistOptions& options() const { return opts_; }

  // Replaces each gradient by its mean over all ranks, in flat buckets of at most bucket_bytes (per dtype/device).
  void average(std::vector<torch::Tensor>& grads);
  // Reduces a few numbers over all ranks (op: sum | max | min), in float64.
  std::vector<double> all_reduce(const std::vector<double>& values, const std::string& op);
  // Waits for every rank; `what` names the step in the error.
  void barrier(std::chrono::milliseconds timeout, const std::string& what);
  // Leaves the group (idempotent); later calls throw.
  void destroy();

 private:
  struct Impl;
  DistOptions opts_;
  std::unique_ptr<Impl> impl_;
  Impl& impl(const char* what);
};

}  // namespace tl
