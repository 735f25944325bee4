// CUDA graphs for the LoRA training step (TrainerConfig::cuda_graphs, `--cuda-graphs`): the UNet forward, the loss
// and the backward of one micro-batch are captured once per input shape (batch, latent size, text length, dtypes)
// and replayed, so a step costs a few graph launches instead of thousands of kernel launches.
//
// Everything random or data-dependent stays eager and outside the graph: the VAE encode or cached-latent sample, the
// noise, the timesteps, add_noise and the text embeddings are computed as before and copied into the graph's static
// inputs, so the random streams (and a resume) are exactly those of eager training. The loss divisor and loss scale
// reach the graph as a device tensor (the backward's incoming gradient), not as baked-in constants. The graph writes
// its gradients into static buffers; they are added to (or, at the start of an accumulation, copied into) the
// parameters' .grad, so AdamW, clipping, unscaling and data-parallel averaging are unchanged.
//
// Compiled in (TRAIN_LORA_CUDA_GRAPHS, set by CMakeLists.txt for trainer.cpp) in CUDA builds that found the CUDA
// runtime headers. A shape runs eagerly for kWarmup micro-steps first (cuBLAS/cuDNN handles, allocator warm-up), then is captured on
// a side stream. When graphs cannot be used at all (a CPU or MPS device, a build without CUDA, full training, LoRA
// dropout, min-SNR weighting, gradient checkpointing) or a capture fails, training runs eagerly and status() says
// why (the training loop logs it). Only trainer.cpp includes this header: the class's layout depends on the build.
// NOT YET RUN ON A GPU: only the CPU fallback is tested (no device was available).
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "train/trainer.h"  // StepGraphStatus

#if defined(TRAIN_LORA_CUDA_GRAPHS)
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace tl {

// The UNet part of a micro-step: (noisy latents, timesteps, text embeddings, target) -> loss (a 0-dim tensor).
using UnetLossFn = std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>;

class StepGraphs {
 public:
  static constexpr int64_t kWarmup = 2;

  // `unsupported`: why graphs cannot be used by this trainer ("" when they can).
  StepGraphs(bool requested, const torch::Device& device, const std::string& unsupported) {
    status_.requested = requested;
    if (!requested) return;
#if defined(TRAIN_LORA_CUDA_GRAPHS)
    if (!device.is_cuda())
      status_.reason = "device " + device.str() + ": CUDA graphs exist only on CUDA devices; training runs eagerly";
    else if (!unsupported.empty())
      status_.reason = unsupported + ": training runs eagerly";
    else
      status_.active = true;
#else
    (void)device;
    (void)unsupported;
    status_.reason = "this build of the addon has no CUDA graphs (a CPU libtorch, or the CUDA headers were not found at build time): training runs eagerly";
#endif
  }

  const StepGraphStatus& status() const { return status_; }

  // Runs the micro-step's UNet part from a graph and accumulates the gradients into params' .grad; returns the loss,
  // or nullopt when the caller must run it eagerly (graphs off, warm-up, a failed capture).
  std::optional<double> run(const torch::Tensor& noisy, const torch::Tensor& timesteps, const torch::Tensor& ehs, const torch::Tensor& target,
                            double grad_scale, std::vector<torch::Tensor>& params, const UnetLossFn& fn) {
    if (!status_.requested) return std::nullopt;
    if (!status_.active) {
      ++status_.eager;
      return std::nullopt;
    }
#if defined(TRAIN_LORA_CUDA_GRAPHS)
    const std::string key = shape_key({noisy, timesteps, ehs, target});
    auto& slot = entries_[key];
    if (!slot) slot = std::make_unique<Entry>();
    Entry& e = *slot;
    if (e.failed || e.seen++ < kWarmup) {
      ++status_.eager;
      return std::nullopt;
    }
    if (!e.captured && !capture(e, noisy, timesteps, ehs, target, params, fn)) {
      ++status_.eager;
      return std::nullopt;
    }
    torch::NoGradGuard ng;
    e.noisy.copy_(noisy);
    e.timesteps.copy_(timesteps);
    e.ehs.copy_(ehs);
    e.target.copy_(target);
    e.grad_out.fill_(grad_scale);
    e.graph->replay();
    for (size_t i = 0; i < params.size(); ++i) {
      auto& g = params[i].mutable_grad();
      if (!g.defined())
        g = e.grads[i].clone();
      else
        g.add_(e.grads[i]);
    }
    ++status_.replays;
    return e.loss.item<double>();
#else
    (void)noisy, (void)timesteps, (void)ehs, (void)target, (void)grad_scale, (void)params, (void)fn;
    return std::nullopt;
#endif
  }

 private:
  StepGraphStatus status_;

#if defined(TRAIN_LORA_CUDA_GRAPHS)
  struct Entry {
    std::unique_ptr<at::cuda::CUDAGraph> graph;
    torch::Tensor noisy, timesteps, ehs, target, grad_out, loss;
    std::vector<torch::Tensor> grads;
    int64_t seen = 0;
    bool captured = false, failed = false;
  };
  std::map<std::string, std::unique_ptr<Entry>> entries_;

  static std::string shape_key(std::initializer_list<torch::Tensor> ts) {
    std::string k;
    for (const auto& t : ts) k += c10::str(t.sizes(), t.scalar_type(), t.device(), ";");
    return k;
  }

  bool capture(Entry& e, const torch::Tensor& noisy, const torch::Tensor& timesteps, const torch::Tensor& ehs, const torch::Tensor& target,
               std::vector<torch::Tensor>& params, const UnetLossFn& fn) {
    e.noisy = noisy.clone();
    e.timesteps = timesteps.clone();
    e.ehs = ehs.clone();
    e.target = target.clone();
    e.grad_out = torch::ones({}, torch::TensorOptions().dtype(torch::kFloat32).device(noisy.device()));
    // The graph's backward must create (not accumulate into) its gradient buffers: park the current ones.
    std::vector<torch::Tensor> parked;
    for (auto& p : params) parked.push_back(std::exchange(p.mutable_grad(), torch::Tensor()));
    auto restore = [&]() {
      for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = parked[i];
    };
    c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(noisy.device().index());
    c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, noisy.device().index());
    at::cuda::CUDAEvent ready;
    ready.record(current);
    ready.block(side);
    e.graph = std::make_unique<at::cuda::CUDAGraph>();
    // Autocast's weight-cast cache would hand the graph tensors from outside its memory pool.
    const bool cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    std::string error;
    {
      c10::cuda::CUDAStreamGuard guard(side);
      e.graph->capture_begin();
      try {
        torch::AutoGradMode g(true);
        e.loss = fn(e.noisy, e.timesteps, e.ehs, e.target);
        e.loss.backward(e.grad_out.to(e.loss.scalar_type()));
      } catch (const std::exception& ex) {
        error = ex.what();
      }
      try {
        e.graph->capture_end();
      } catch (const std::exception& ex) {
        if (error.empty()) error = ex.what();
      }
    }
    at::autocast::set_autocast_cache_enabled(cache);
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(current);
    if (error.empty())
      for (auto& p : params) {
        if (!p.grad().defined()) {
          error = "a LoRA parameter got no gradient in the captured backward";
          break;
        }
        e.grads.push_back(p.grad());
      }
    restore();
    if (!error.empty()) {
      e.failed = true;
      e.graph.reset();
      e.grads.clear();
      status_.reason = "CUDA graph capture failed for shape " + shape_key({noisy, timesteps, ehs, target}) + " (" + error.substr(0, error.find('\n')) +
                       "): that shape runs eagerly";
      return false;
    }
    e.captured = true;
    ++status_.graphs;
    return true;
  }
#endif
};

}  // namespace tl
