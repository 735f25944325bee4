// VAE posteriors kept natively, one entry per dataset item: --cache-latents encodes every training image once, and
// the validation loss encodes its held-out images once and fixes each one's latent and noise. Micro-batches then
// name the items they hold and are gathered here, on the torch thread; no latent crosses into JavaScript.
//
// Entries are float32 on the CPU, contiguous, exactly the values vaeEncode would hand to JS: a micro-batch gathered
// from them equals one built from host copies, bit for bit (the trainer converts to its device and dtype as before).
#pragma once
#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pipeline/pipeline.h"
#include "runtime/engine.h"
#include "train/trainer.h"

namespace tl {

class LatentCache {
 public:
  explicit LatentCache(std::shared_ptr<Pipeline> p) : pipe_(std::move(p)) {}

  // Encodes pixel values [B,3,H,W] in [-1,1] with the pipeline's VAE and keeps the posterior of items[k] = row k.
  // `loss_mask` ([B,1,h,w] at the latent size, --masked-loss) is kept beside it when defined. Returns [C,h,w].
  std::vector<int64_t> encode(const std::vector<int64_t>& items, const torch::Tensor& pixels, const torch::Tensor& loss_mask) {
    if (!pipe_->vae) throw UserError("EINPUT", "the VAE is not loaded");
    if (pixels.dim() != 4 || pixels.size(0) != static_cast<int64_t>(items.size()))
      throw UserError("EINPUT", "latent cache: pixel values must be [B,3,H,W] with one row per item");
    torch::NoGradGuard ng;
    auto post = pipe_->vae->encode(pixels.to(pipe_->device));  // in the VAE's own dtype
    auto mean = post.mean.to(torch::kCPU, torch::kFloat32).contiguous();
    auto std = post.std.to(torch::kCPU, torch::kFloat32).contiguous();
    torch::Tensor mask = loss_mask.defined() ? loss_mask.to(torch::kCPU, torch::kFloat32).contiguous() : torch::Tensor();
    if (mask.defined() && (mask.dim() != 4 || mask.size(0) != mean.size(0) || mask.size(1) != 1 || mask.size(2) != mean.size(2) ||
                           mask.size(3) != mean.size(3)))
      throw UserError("EINPUT", "latent cache: lossMask must be [B,1,h,w] at the latent size");
    for (size_t k = 0; k < items.size(); ++k) {
      if (items[k] < 0) throw UserError("EINPUT", "latent cache: item " + std::to_string(items[k]) + " is negative");
      if (static_cast<size_t>(items[k]) >= entries_.size()) entries_.resize(static_cast<size_t>(items[k]) + 1);
      const auto row = static_cast<int64_t>(k);
      entries_[static_cast<size_t>(items[k])] = Entry{mean[row].clone(), std[row].clone(), mask.defined() ? mask[row].clone() : torch::Tensor(), {}, {}};
    }
    return mean.sizes().slice(1).vec();
  }

  // Validation loss: fixes items' latents, (mean + std·z)·scaling_factor with the loaded VAE's factor (computed in
  // float64, rounded once to float32), and their diffusion noise. z, noise: [B,C,h,w], one row per item.
  void fix(const std::vector<int64_t>& items, const torch::Tensor& z, const torch::Tensor& noise) {
    const double sf = pipe_->vae ? pipe_->vae->config.scaling_factor : 0.18215;
    for (size_t k = 0; k < items.size(); ++k) {
      Entry& e = at(items[k]);
      const auto row = static_cast<int64_t>(k);
      if (z.dim() != 4 || noise.sizes() != z.sizes() || z.size(0) != static_cast<int64_t>(items.size()) || z[row].sizes() != e.mean.sizes())
        throw UserError("EINPUT", "latent cache: z and noise must be [B,C,h,w] at the items' latent size");
      e.latents = ((e.mean.to(torch::kFloat64) + e.std.to(torch::kFloat64) * z[row].to(torch::kFloat64)) * sf).to(torch::kFloat32);
      e.noise = noise[row].to(torch::kFloat32).contiguous();
    }
  }

  // Fills a micro-batch's image part from items' entries: the posterior (latent_mean/latent_std), or the fixed
  // latents and noise where every item has them; loss_mask when the entries carry masks.
  void fill(MicroBatch& b, const std::vector<int64_t>& items) const {
    if (items.empty()) throw UserError("EINPUT", "latent cache: a micro-batch needs at least one item");
    std::vector<torch::Tensor> mean, std, latents, noise, mask;
    const auto size = at(items[0]).mean.sizes();
    for (int64_t i : items) {
      const Entry& e = at(i);
      if (e.mean.sizes() != size)
        throw UserError("EINPUT", "latent cache: items " + std::to_string(items[0]) + " and " + std::to_string(i) + " have different latent sizes");
      mean.push_back(e.mean), std.push_back(e.std);
      if (e.latents.defined()) latents.push_back(e.latents), noise.push_back(e.noise);
      if (e.mask.defined()) mask.push_back(e.mask);
    }
    if (latents.size() == items.size()) {
      b.latents = torch::stack(latents), b.noise = torch::stack(noise);
    } else {
      b.latent_mean = torch::stack(mean), b.latent_std = torch::stack(std);
    }
    if (mask.size() == items.size()) b.loss_mask = torch::stack(mask);
    else if (!mask.empty()) throw UserError("EINPUT", "latent cache: some items of a micro-batch have a loss mask and some do not");
  }

 private:
  struct Entry {
    torch::Tensor mean, std, mask;  // posterior (before scaling_factor), --masked-loss weights
    torch::Tensor latents, noise;   // fixed by fix() (validation loss)
  };
  // An encoded item's entry; another index is an error naming it.
  Entry& at(int64_t i) { return const_cast<Entry&>(std::as_const(*this).at(i)); }
  const Entry& at(int64_t i) const {
    if (i < 0 || static_cast<size_t>(i) >= entries_.size() || !entries_[static_cast<size_t>(i)].mean.defined())
      throw UserError("EINPUT", "latent cache: item " + std::to_string(i) + " was not encoded");
    return entries_[static_cast<size_t>(i)];
  }
  std::shared_ptr<Pipeline> pipe_;
  std::vector<Entry> entries_;
};

}  // namespace tl
