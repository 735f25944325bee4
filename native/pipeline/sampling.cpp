#include "pipeline/sampling.h"

#include <ATen/CPUGeneratorImpl.h>

#include "runtime/engine.h"
#include "lora/lora.h"

namespace tl {
namespace {

// Puts the pipeline's modules in eval mode for the scope and restores each one's mode afterwards (a Trainer may
// share the pipeline: its UNet is in train mode between its steps).
class EvalScope {
 public:
  explicit EvalScope(Pipeline* p) {
    if (!p) return;
    for (torch::nn::Module* m : {static_cast<torch::nn::Module*>(p->unet.get()), static_cast<torch::nn::Module*>(p->text_encoder.get()),
                                 static_cast<torch::nn::Module*>(p->vae.get())}) {
      if (!m) continue;
      saved_.emplace_back(m, m->is_training());
      m->eval();
    }
  }
  ~EvalScope() {
    for (auto& [m, was] : saved_)
      if (was) m->train(true);
  }
  EvalScope(const EvalScope&) = delete;
  EvalScope& operator=(const EvalScope&) = delete;

 private:
  std::vector<std::pair<torch::nn::Module*, bool>> saved_;
};


}  // namespace

Sampler::Sampler(std::shared_ptr<Pipeline> pipeline, SamplerOptions opts) : pipe_(std::move(pipeline)), opts_(std::move(opts)) {
  torch::NoGradGuard ng;
  gen_ = at::detail::createCPUGenerator(opts_.seed);
  const bool fake = opts_.fake_base.defined();
  if (!fake && !pipe_) throw UserError("EINPUT", "sampling needs a pipeline (or a fake model for scheduler tests)");
  if (opts_.images_per_prompt < 1) throw UserError("EINPUT", "images per prompt must be at least 1");
  std::vector<int64_t> shape;
  if (fake) {
    device_ = torch::kCPU;
    dtype_ = torch::kFloat32;
    shape = opts_.fake_base.sizes().vec();
    opts_.fake_base = opts_.fake_base.to(torch::kFloat32);
    batch_ = shape.empty() ? 0 : shape[0];
  } else {
    auto& p = *pipe_;
    if (!p.unet || !p.text_encoder) throw UserError("EINPUT", "sampling needs the UNet and the text encoder loaded");
    device_ = p.device;
    dtype_ = p.dtype.value_or(torch::kFloat32);
    if (!opts_.input_ids.defined() || opts_.input_ids.dim() != 2 || opts_.input_ids.size(0) < 1)
      throw UserError("EINPUT", "inputIds must be [prompts, tokens] token ids");
    const int64_t P = opts_.input_ids.size(0);
    batch_ = P * opts_.images_per_prompt;
    const int64_t vae_factor = p.vae ? (int64_t{1} << (p.vae->config.block_out_channels.size() - 1)) : 8;
    if (opts_.height <= 0 || opts_.width <= 0 || opts_.height % vae_factor || opts_.width % vae_factor)
      throw UserError("EINPUT", "height and width must be positive multiples of " + std::to_string(vae_factor) + ", got " +
                                    std::to_string(opts_.width) + "x" + std::to_string(opts_.height));
    shape = {batch_, p.unet->config.in_channels, opts_.height / vae_factor, opts_.width / vae_factor};
    EvalScope eval(pipe_.get());
    // encode_prompt: embeddings repeated per image (prompt-major), uncond first when guided.
    auto repeat = [&](torch::Tensor e) {
      const int64_t n = opts_.images_per_prompt;
      return e.repeat({1, n, 1}).view({e.size(0) * n, e.size(1), -1});
    };
    torch::Tensor cond = repeat(p.text_encoder->forward(opts_.input_ids.to(torch::kLong).to(device_)).to(dtype_));
    guided_ = opts_.guidance_scale > 1.0;
    if (guided_) {
      torch::Tensor neg = opts_.negative_input_ids;
      if (!neg.defined()) throw UserError("EINPUT", "guidance > 1 needs negativeInputIds (the empty prompt's ids when there is none)");
      if (neg.dim() != 2 || (neg.size(0) != 1 && neg.size(0) != P))
        throw UserError("EINPUT", "negativeInputIds must be [1 or prompts, tokens] token ids");
      torch::Tensor uncond = p.text_encoder->forward(neg.to(torch::kLong).to(device_)).to(dtype_);
      if (uncond.size(0) == 1 && P > 1) uncond = uncond.expand({P, uncond.size(1), uncond.size(2)});
      prompt_embeds_ = torch::cat({repeat(uncond), cond});
    } else {
      prompt_embeds_ = cond;
    }
  }
  // prepare_latents: randn on the CPU generator in the model dtype, then to the device, times init_noise_sigma.
  torch::Tensor x;
  if (opts_.latents.defined()) {
    if (opts_.latents.sizes().vec() != shape)
      throw UserError("EINPUT", "latents have shape " + c10::str(opts_.latents.sizes()) + ", expected " + c10::str(c10::IntArrayRef(shape)));
    x = opts_.latents.to(device_, dtype_);
  } else {
    x = torch::randn(shape, gen_, torch::TensorOptions().dtype(dtype_)).to(device_);
  }
  x = x * opts_.init_noise_sigma;
  slots_["x"] = x.to(torch::kFloat32);
}

torch::Tensor Sampler::eps_for(const torch::Tensor& model_input, double timestep) {
  if (opts_.fake_base.defined()) return opts_.fake_base + opts_.fake_input_scale * model_input;
  auto& p = *pipe_;
  torch::Tensor in = model_input.to(dtype_);
  if (guided_) in = torch::cat({in, in});
  torch::Tensor t = torch::full({}, static_cast<float>(timestep), torch::TensorOptions().dtype(torch::kFloat32).device(device_));
  torch::Tensor pred = p.unet->forward(in, t, prompt_embeds_);
  if (guided_) {
    auto parts = pred.chunk(2);
    pred = parts[0] + opts_.guidance_scale * (parts[1] - parts[0]);
  }
  return pred.to(torch::kFloat32);
}

void Sampler::step(double timestep, double model_input_scale, const std::vector<SamplerOp>& ops) {
  torch::NoGradGuard ng;
  EvalScope eval(pipe_.get());
  const torch::Tensor& x = slots_.at("x");
  slots_["eps"] = eps_for(model_input_scale == 1.0 ? x : x * model_input_scale, timestep);
  for (const auto& op : ops) {
    torch::Tensor r;
    if (op.terms.size() == 1 && op.terms[0].second == 1.0 && !op.noise && !op.clamp) {
      auto it = slots_.find(op.terms[0].first);
      if (it == slots_.end()) throw UserError("EINPUT", "sampler op reads slot \"" + op.terms[0].first + "\", which is not set");
      slots_[op.target] = it->second;  // slots are never modified in place: sharing is safe
      continue;
    }
    for (const auto& [name, coef] : op.terms) {
      auto it = slots_.find(name);
      if (it == slots_.end()) throw UserError("EINPUT", "sampler op reads slot \"" + name + "\", which is not set");
      r = r.defined() ? r + coef * it->second : coef * it->second;
    }
    if (op.noise) {
      const auto& like = slots_.at("eps");
      torch::Tensor n = torch::randn(like.sizes(), gen_, torch::TensorOptions().dtype(dtype_)).to(device_, torch::kFloat32);
      r = r.defined() ? r + *op.noise * n : *op.noise * n;
    }
    if (!r.defined()) throw UserError("EINPUT", "sampler op for \"" + op.target + "\" has no terms");
    if (op.clamp) r = r.clamp(op.clamp->first, op.clamp->second);
    slots_[op.target] = r;
  }
}

torch::Tensor Sampler::decode_images() {
  if (!pipe_ || !pipe_->vae) throw UserError("EINPUT", "decoding needs the VAE loaded");
  torch::NoGradGuard ng;
  EvalScope eval(pipe_.get());
  auto& vae = *pipe_->vae;
  torch::Tensor z = slots_.at("x").to(dtype_) / vae.config.scaling_factor;
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < z.size(0); ++i) {  // one image at a time: SD's VAE decoder is the memory peak
    torch::Tensor img = vae.decode(z.slice(0, i, i + 1));
    out.push_back((img / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1}).to(torch::kCPU, torch::kFloat32).contiguous());
  }
  return torch::cat(out);
}

torch::Tensor Sampler::latents() const { return slots_.at("x").to(torch::kCPU, torch::kFloat32).contiguous(); }


}  // namespace tl
