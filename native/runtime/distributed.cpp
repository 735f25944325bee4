#include "runtime/distributed.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if defined(TRAIN_LORA_CUDA) && defined(TRAIN_LORA_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>
#include <map>

#include "runtime/engine.h"

namespace tl {
namespace {

std::string message_of(const std::exception& e) {
  if (auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

std::string seconds(std::chrono::milliseconds ms) {
  std::ostringstream s;
  s << static_cast<double>(ms.count()) / 1000.0 << " s";
  return s.str();
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

}  // namespace

std::vector<std::string> dist_backends() {
  std::vector<std::string> out{"gloo"};
#if defined(TRAIN_LORA_CUDA) && defined(TRAIN_LORA_NCCL)
  out.push_back("nccl");
#endif
  return out;
}

struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  bool cuda = false;  // collectives on CUDA tensors (nccl)
};

ProcessGroup::Impl& ProcessGroup::impl(const char* what) {
  if (!impl_) throw UserError("EDIST", std::string(what) + ": the process group was destroyed");
  return *impl_;
}

ProcessGroup::ProcessGroup(const DistOptions& o) : opts_(o) {
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size)
    throw UserError("EDIST", "rank " + std::to_string(o.rank) + " must be in [0, " + std::to_string(o.world_size) + ")");
  if (o.master_port < 1 || o.master_port > 65535)
    throw UserError("EDIST", "--master-port must be in 1..65535, got " + std::to_string(o.master_port));
  const std::string who = "rank " + std::to_string(o.rank) + " of " + std::to_string(o.world_size);
  auto impl = std::make_unique<Impl>();
  // Rendezvous: rank 0 hosts the TCPStore and waits for every rank to connect.
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(o.master_port);
    so.isServer = o.rank == 0;
    so.numWorkers = static_cast<size_t>(o.world_size);
    so.waitWorkers = true;
    so.timeout = o.timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(o.master_addr, so);
    impl->store = c10::make_intrusive<c10d::PrefixStore>("train_lora", tcp);
  } catch (const std::exception& e) {
    throw UserError("EDIST", who + ": rendezvous at " + o.master_addr + ":" + std::to_string(o.master_port) + " failed within " + seconds(o.timeout) +
                                 ": " + message_of(e) +
                                 "\nCheck that every rank uses the same --master-addr/--master-port (MASTER_ADDR/MASTER_PORT), that WORLD_SIZE ranks were started, "
                                 "and that the port is free on the master.");
  }
  try {
    if (o.backend == "gloo") {
      auto go = c10d::ProcessGroupGloo::Options::create(o.timeout);
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
        go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      else if (is_loopback(o.master_addr))
        go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      else
        go->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      impl->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, o.rank, o.world_size, go);
    } else if (o.backend == "nccl") {
#if defined(TRAIN_LORA_CUDA) && defined(TRAIN_LORA_NCCL)
      auto no = c10d::ProcessGroupNCCL::Options::create();
      no->timeout = o.timeout;
      impl->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl->store, o.rank, o.world_size, no);
      impl->cuda = true;
#else
      throw UserError("EDIST", "this build has no NCCL backend (it needs a CUDA libtorch and nccl.h at build time): use --dist-backend gloo");
#endif
    } else {
      throw UserError("EDIST", "unknown distributed backend '" + o.backend + "': use gloo or nccl");
    }
  } catch (const UserError&) {
    throw;
  } catch (const std::exception& e) {
    throw UserError("EDIST", who + ": creating the " + o.backend + " process group failed: " + message_of(e));
  }
  impl_ = std::move(impl);
  // Connectivity check, so that a broken peer shows up here and not in the first training step.
  barrier(o.timeout, "joining the process group");
}

ProcessGroup::~ProcessGroup() {
  try {
    destroy();
  } catch (...) {
  }
}

void ProcessGroup::destroy() {
  if (!impl_) return;
  auto impl = std::move(impl_);
  impl->backend.reset();
  impl->store.reset();
}

void ProcessGroup::average(std::vector<torch::Tensor>& grads) {
  auto& im = impl("averaging gradients");
  if (opts_.world_size == 1 || grads.empty()) return;
  torch::NoGradGuard ng;
  // Buckets of same dtype and device, in parameter order, each at most bucket_bytes (one tensor may exceed it).
  struct Bucket {
    std::vector<size_t> members;
    int64_t bytes = 0;
  };
  std::vector<Bucket> buckets;
  std::map<std::pair<int, std::string>, size_t> open;  // (dtype, device) -> index of the bucket being filled
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    auto key = std::make_pair(static_cast<int>(g.scalar_type()), g.device().str());
    const int64_t bytes = g.numel() * static_cast<int64_t>(g.element_size());
    auto it = open.find(key);
    if (it == open.end() || buckets[it->second].bytes + bytes > opts_.bucket_bytes) {
      buckets.push_back({});
      open[key] = buckets.size() - 1;
      it = open.find(key);
    }
    buckets[it->second].members.push_back(i);
    buckets[it->second].bytes += bytes;
  }
  std::vector<torch::Tensor> flats;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  try {
    for (const auto& b : buckets) {
      std::vector<torch::Tensor> parts;
      for (size_t i : b.members) parts.push_back(grads[i].reshape({-1}));
      std::vector<torch::Tensor> one{torch::cat(parts)};
      flats.push_back(one[0]);
      c10d::AllreduceOptions ao;
      ao.reduceOp = c10d::ReduceOp::SUM;
      works.push_back(im.backend->allreduce(one, ao));
    }
    for (auto& w : works) w->wait(opts_.timeout);
  } catch (const std::exception& e) {
    throw UserError("EDIST", "rank " + std::to_string(opts_.rank) + ": averaging gradients over " + std::to_string(opts_.world_size) +
                                 " ranks failed (another rank stopped or the network broke; timeout " + seconds(opts_.timeout) + "): " + message_of(e));
  }
  const double inv = 1.0 / opts_.world_size;
  for (size_t k = 0; k < buckets.size(); ++k) {
    flats[k].mul_(inv);
    int64_t off = 0;
    for (size_t i : buckets[k].members) {
      auto& g = grads[i];
      g.copy_(flats[k].narrow(0, off, g.numel()).view(g.sizes()));
      off += g.numel();
    }
  }
}

std::vector<double> ProcessGroup::all_reduce(const std::vector<double>& values, const std::string& op) {
  auto& im = impl("all-reduce");
  if (values.empty()) return {};
  c10d::AllreduceOptions ao;
  if (op == "sum") ao.reduceOp = c10d::ReduceOp::SUM;
  else if (op == "max") ao.reduceOp = c10d::ReduceOp::MAX;
  else if (op == "min") ao.reduceOp = c10d::ReduceOp::MIN;
  else throw UserError("EINPUT", "all-reduce op must be sum, max or min, got " + op);
  torch::Tensor t = torch::tensor(values, torch::kFloat64);
  if (im.cuda) t = t.to(torch::Device(opts_.device));
  std::vector<torch::Tensor> one{t};
  try {
    im.backend->allreduce(one, ao)->wait(opts_.timeout);
  } catch (const std::exception& e) {
    throw UserError("EDIST", "rank " + std::to_string(opts_.rank) + ": all-reduce over " + std::to_string(opts_.world_size) +
                                 " ranks failed (another rank stopped or the network broke; timeout " + seconds(opts_.timeout) + "): " + message_of(e));
  }
  torch::Tensor h = one[0].cpu().contiguous();
  return std::vector<double>(h.data_ptr<double>(), h.data_ptr<double>() + h.numel());
}

void ProcessGroup::barrier(std::chrono::milliseconds timeout, const std::string& what) {
  auto& im = impl(what.c_str());
  if (opts_.world_size == 1) return;
  try {
    c10d::BarrierOptions bo;
    bo.timeout = timeout;
    im.backend->barrier(bo)->wait(timeout);
  } catch (const std::exception& e) {
    throw UserError("EDIST", "rank " + std::to_string(opts_.rank) + ": " + what + ": not every rank of " + std::to_string(opts_.world_size) +
                                 " arrived within " + seconds(timeout) + " (another rank stopped or hangs): " + message_of(e));
  }
}

}  // namespace tl
