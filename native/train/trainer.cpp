#include "train/trainer.h"

#include <cmath>

#include "runtime/engine.h"
#include "train/cuda_graph.h"

namespace tl {
namespace {

torch::Tensor broadcast_to_dims(torch::Tensor coef, int64_t dims) {
  coef = coef.flatten();
  while (coef.dim() < dims) coef = coef.unsqueeze(-1);
  return coef;
}

}  // namespace

Trainer::Trainer(std::shared_ptr<Pipeline> pipeline, TrainerConfig cfg) : pipe_(std::move(pipeline)), cfg_(std::move(cfg)) {
  if (!pipe_->unet) throw UserError("EINPUT", "training needs the UNet");
  if (cfg_.alphas_cumprod.empty()) throw UserError("EINPUT", "training needs the noise schedule (alphas_cumprod)");
  if (!(cfg_.init_loss_scale > 0) || !(cfg_.growth_factor > 1) || !(cfg_.backoff_factor > 0 && cfg_.backoff_factor < 1) || cfg_.growth_interval < 1)
    throw UserError("EINPUT", "loss scaling needs init scale > 0, growth factor > 1, 0 < backoff factor < 1 and growth interval >= 1");
  // --train-text-encoder: checked before any adapter is added (a refused run leaves the pipeline as it was).
  if (cfg_.train_text_encoder) {
    if (cfg_.mode != TrainMode::Lora)
      throw UserError("EINPUT", "--train-text-encoder trains LoRA adapters on the text encoder: it needs --train-mode lora (full training covers the UNet only)");
    if (!pipe_->text_encoder) throw UserError("EINPUT", "--train-text-encoder needs the text encoder loaded");
    auto& te = *pipe_->text_encoder;
    // Every target must select a Linear of the text encoder: an unknown or unmatched target is an error naming it.
    std::vector<std::string> bad;
    for (const auto& t : cfg_.text_encoder_targets)
      if (find_lora_targets(te, {t}).empty()) bad.push_back("\"" + t + "\"");
    if (!bad.empty() || cfg_.text_encoder_targets.empty()) {
      std::string list;
      for (const auto& b : bad) list += (list.empty() ? "" : ", ") + b;
      throw UserError("ELORATARGET", "--text-encoder-target-modules: " + (bad.empty() ? std::string("no targets given") : list + " match" + (bad.size() == 1 ? "es" : "") + " no Linear module of the text encoder") +
                                         ". Its Linear modules: q_proj, k_proj, v_proj, out_proj (self_attn), fc1, fc2 (mlp); also as self_attn.q_proj, mlp.fc1, ...");
    }
  }
  const auto dev = pipe_->device;
  // diffusers' set_seed(args.seed) comes before the adapters are created, so their init is seeded too.
  torch::manual_seed(cfg_.seed);
  auto& unet = *pipe_->unet;
  if (cfg_.mode == TrainMode::Lora) {
    auto targets = inject_lora(unet, cfg_.lora_targets, cfg_.lora, dev, cfg_.conv_lora);
    for (const auto& t : targets) {
      params_.emplace_back(lora_key("unet", t.path, true, LoraFormat::Peft), t.layer->lora_A);
      params_.emplace_back(lora_key("unet", t.path, false, LoraFormat::Peft), t.layer->lora_B);
    }
  } else {
    // Mixed precision in full mode is autocast over these fp32 weights (their gradients and AdamW stay fp32).
    if (pipe_->dtype && *pipe_->dtype != torch::kFloat32)
      throw UserError("EINPUT", "full training keeps fp32 master weights: load the UNet in fp32");
    for (const auto& p : unet.named_parameters(true)) params_.emplace_back(p.key(), p.value());
  }
  if (cfg_.train_text_encoder) {
    auto& te = *pipe_->text_encoder;
    // After the UNet's adapters, from the same seeded stream (diffusers adds the text encoder's adapter second).
    te_params_begin_ = params_.size();
    for (const auto& t : inject_lora(te, cfg_.text_encoder_targets, cfg_.lora, dev)) {
      params_.emplace_back(lora_key("text_encoder", t.path, true, LoraFormat::Peft), t.layer->lora_A);
      params_.emplace_back(lora_key("text_encoder", t.path, false, LoraFormat::Peft), t.layer->lora_B);
    }
    te.train();
  }
  for (auto& [_, p] : params_) p.set_requires_grad(true);
  unet.gradient_checkpointing = cfg_.gradient_checkpointing;
  unet.train();
  alphas_cumprod_ = torch::tensor(cfg_.alphas_cumprod, torch::kFloat32);
  scaler_.enabled = cfg_.mixed_precision == MixedPrecision::FP16;
  scaler_.scale = scaler_.enabled ? cfg_.init_loss_scale : 1.0;
  reset_optimizer();
  std::string no_graphs;
  if (cfg_.mode != TrainMode::Lora) no_graphs = "full training (graphs are for LoRA)";
  else if (cfg_.lora.dropout > 0) no_graphs = "LoRA dropout (random masks inside the step)";
  else if (cfg_.snr_gamma) no_graphs = "min-SNR weighting (--snr-gamma)";
  else if (cfg_.gradient_checkpointing) no_graphs = "gradient checkpointing";
  else if (cfg_.train_text_encoder) no_graphs = "a trained text encoder (its backward is outside the graphed UNet step)";
  graphs_ = std::make_shared<StepGraphs>(cfg_.cuda_graphs, dev, no_graphs);
}

StepGraphStatus Trainer::graph_status() const { return graphs_->status(); }

void Trainer::reset_optimizer() {
  exp_avg_.clear();
  exp_avg_sq_.clear();
  steps_.clear();
  for (const auto& [name, p] : params_) {
    exp_avg_[name] = torch::zeros_like(p, torch::MemoryFormat::Preserve);
    exp_avg_sq_[name] = torch::zeros_like(p, torch::MemoryFormat::Preserve);
    steps_[name] = 0;
  }
}

// This rank's rows of a draw for the global batch (see DataParallel); a plain draw with one process.
torch::Tensor Trainer::randn_rows(c10::IntArrayRef sizes, const torch::TensorOptions& o) const {
  const int64_t R = data_parallel.world_size, rank = data_parallel.rank;
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  const int64_t rows = s[0];
  s[0] *= R;
  return torch::randn(s, o).narrow(0, rank * rows, rows).contiguous();
}

// The micro-batch's latents in the pipeline's dtype: given (test hook), or a sample of the VAE posterior (encoded
// now, or cached) times scaling_factor. `global_strides` receives the global batch's latent layout when it differs
// from this rank's (data parallel with one row per rank).
torch::Tensor Trainer::latents_for(const MicroBatch& b, std::vector<int64_t>& global_strides) {
  auto& p = *pipe_;
  const auto dev = p.device;
  const auto dt = p.dtype.value_or(torch::kFloat32);
  const int64_t R = data_parallel.world_size;
  torch::NoGradGuard ng;
  torch::Tensor latents;
  if (b.latents.defined()) {
    latents = b.latents.to(dev, dt);
  } else {
    torch::Tensor mean, std;
    if (b.pixel_values.defined()) {
      if (!p.vae) throw UserError("EINPUT", "pixel values given but the VAE is not loaded");
      auto post = p.vae->encode(b.pixel_values.to(dev));  // in the VAE's dtype (fp32 under force_upcast)
      mean = post.mean, std = post.std;
    } else if (b.latent_mean.defined() && b.latent_std.defined()) {
      mean = b.latent_mean.to(dev, dt), std = b.latent_std.to(dev, dt);
    } else {
      throw UserError("EINPUT", "a micro-batch needs pixel values or cached latents");
    }
    // latent_dist.sample(): mean + std * N(0, 1)
    latents = mean + std * (R == 1 ? torch::randn(mean.sizes(), mean.options()) : randn_rows(mean.sizes(), mean.options()));
    const double sf = p.vae ? p.vae->config.scaling_factor : 0.18215;
    // In the pipeline's dtype, as diffusers' script has them (an fp32 VAE under force_upcast returns fp32).
    latents = (latents * sf).to(dt);
    // With one row per rank the VAE's output has another memory layout than the global batch's would (diffusers'
    // too: channels_last after the attention at >= 2 rows, contiguous at 1), and randn_like below follows the
    // layout. The global layout is probed once per image size with a 2-row encode (no random numbers drawn).
    if (R > 1 && latents.size(0) == 1 && b.pixel_values.defined()) {
      auto key = b.pixel_values.sizes().vec();
      auto it = global_layout_.find(key);
      if (it == global_layout_.end()) {
        auto pixels = b.pixel_values.to(dev);
        auto post = p.vae->encode(pixels.expand({2, -1, -1, -1}).contiguous());
        auto probe = ((post.mean + post.std * torch::zeros(post.mean.sizes(), post.mean.options())) * sf).to(dt);
        it = global_layout_.emplace(key, probe.strides().vec()).first;
      }
      global_strides = it->second;
    }
  }
  return latents;
}

torch::Tensor Trainer::loss_for(const MicroBatch& b, bool train, UnetInputs* inputs_only) {
  auto& p = *pipe_;
  const auto dev = p.device;
  const auto dt = p.dtype.value_or(torch::kFloat32);
  const int64_t R = data_parallel.world_size, rank = data_parallel.rank;
  std::vector<int64_t> global_strides;  // the layout of the global batch's latents when it differs from latents'
  const torch::Tensor latents = latents_for(b, global_strides);
  const int64_t B = latents.size(0);
  // randn_like(latents) keeps latents' memory layout (not always contiguous: the VAE posterior is a chunk), and
  // the fill order (and generator use) follows the layout: the global draw must have the same layout.
  auto randn_like_rows = [&](const torch::Tensor& like) {
    if (R == 1) return torch::randn_like(like);
    const int64_t D = like.dim();
    std::vector<int64_t> order(D);  // dims from outermost to innermost in memory
    for (int64_t d = 0; d < D; ++d) order[d] = d;
    const std::vector<int64_t> strides = global_strides.empty() ? like.strides().vec() : global_strides;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return strides[a] > strides[c]; });
    std::vector<int64_t> sizes(D), inverse(D);
    for (int64_t k = 0; k < D; ++k) {
      sizes[k] = like.size(order[k]) * (order[k] == 0 ? R : 1);
      inverse[order[k]] = k;
    }
    torch::Tensor full = torch::empty(sizes, like.options()).permute(inverse);
    full.normal_();
    return full.narrow(0, rank * like.size(0), like.size(0));
  };
  torch::Tensor noise = b.noise.defined() ? b.noise.to(dev, latents.scalar_type()) : randn_like_rows(latents);
  if (cfg_.noise_offset != 0 && !b.noise.defined())
    noise = noise + cfg_.noise_offset * randn_rows({B, latents.size(1), 1, 1}, latents.options());
  const int64_t T = alphas_cumprod_.size(0);
  torch::Tensor timesteps =
      b.timesteps.defined() ? b.timesteps.to(dev, torch::kLong)
                            : torch::randint(0, T, {B * R}, torch::TensorOptions().dtype(torch::kLong).device(dev)).narrow(0, rank * B, B).contiguous();
  // add_noise / get_velocity exactly as DDPMScheduler: coefficients in the sample dtype.
  torch::Tensor ac = alphas_cumprod_.to(dev, latents.scalar_type());
  torch::Tensor sqrt_alpha = broadcast_to_dims(ac.index({timesteps}).pow(0.5), latents.dim());
  torch::Tensor sqrt_one_minus = broadcast_to_dims((1 - ac.index({timesteps})).pow(0.5), latents.dim());
  torch::Tensor noisy = sqrt_alpha * latents + sqrt_one_minus * noise;
  torch::Tensor target = cfg_.prediction_type == PredictionType::Epsilon ? noise : sqrt_alpha * noise - sqrt_one_minus * latents;

  torch::Tensor ehs;
  if (b.encoder_hidden_states.defined()) {
    ehs = b.encoder_hidden_states.to(dev, dt);
  } else {
    if (!p.text_encoder) throw UserError("EINPUT", "input ids given but the text encoder is not loaded");
    if (cfg_.train_text_encoder) {
      // A trained text encoder: with grad in training, under autocast and gradient checkpointing like the UNet.
      torch::AutoGradMode g(train);
      nn::AutocastScope autocast(dev.type(), autocast_dtype());
      ehs = p.text_encoder->forward(b.input_ids.to(dev), cfg_.gradient_checkpointing && train);
    } else {
      torch::NoGradGuard ng;
      ehs = text_embeddings(b.input_ids);
    }
  }
  torch::Tensor mask;  // --masked-loss: a weight per latent pixel
  if (b.loss_mask.defined()) {
    mask = b.loss_mask.to(dev, torch::kFloat32);
    if (mask.dim() != 4 || mask.size(0) != B || mask.size(1) != 1 || mask.size(2) != latents.size(2) || mask.size(3) != latents.size(3))
      throw UserError("EINPUT", "lossMask must be [B,1,h,w] at the latent size");
  }
  if (inputs_only) {
    *inputs_only = UnetInputs{noisy, timesteps, ehs, target, mask};
    return {};
  }
  return unet_loss(noisy, timesteps, ehs, target, mask, train);
}

torch::Tensor Trainer::unet_loss(const torch::Tensor& noisy, const torch::Tensor& timesteps, const torch::Tensor& ehs, const torch::Tensor& target,
                                 const torch::Tensor& mask, bool train) {
  auto& p = *pipe_;
  const auto dev = p.device;
  torch::Tensor pred;
  {
    torch::AutoGradMode g(train);
    nn::AutocastScope autocast(dev.type(), autocast_dtype());
    pred = p.unet->forward(noisy, timesteps, ehs);
  }
  if (!cfg_.snr_gamma && !mask.defined()) return torch::mse_loss(pred.to(torch::kFloat32), target.to(torch::kFloat32));
  if (!cfg_.snr_gamma) return (torch::mse_loss(pred.to(torch::kFloat32), target.to(torch::kFloat32), at::Reduction::None) * mask).mean();
  // Min-SNR weighting (compute_snr in diffusers' training_utils), then per-sample mean * weight.
  torch::Tensor acc = alphas_cumprod_.to(dev);
  torch::Tensor alpha = acc.pow(0.5).index({timesteps}).to(torch::kFloat32);
  torch::Tensor sigma = (1.0 - acc).pow(0.5).index({timesteps}).to(torch::kFloat32);
  torch::Tensor snr = (alpha / sigma).pow(2);
  torch::Tensor w = torch::amin(torch::stack({snr, *cfg_.snr_gamma * torch::ones_like(snr)}, 1), 1);
  w = cfg_.prediction_type == PredictionType::Epsilon ? w / snr : w / (snr + 1);
  torch::Tensor l = torch::mse_loss(pred.to(torch::kFloat32), target.to(torch::kFloat32), at::Reduction::None);
  if (mask.defined()) l = l * mask;
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < l.dim(); ++d) dims.push_back(d);
  return (l.mean(dims) * w).mean();
}

torch::Tensor Trainer::text_embeddings(const torch::Tensor& input_ids) {
  auto& te = *pipe_->text_encoder;
  const auto dev = pipe_->device;
  bool frozen = true;
  for (const auto& p : te.parameters(true)) frozen = frozen && !p.requires_grad();
  if (cfg_.text_embedding_cache_bytes <= 0 || !frozen) return te.forward(input_ids.to(dev));
  torch::Tensor ids = input_ids.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t B = ids.size(0), L = ids.size(1);
  std::vector<torch::Tensor> rows;
  for (int64_t i = 0; i < B; ++i) {
    std::string key(reinterpret_cast<const char*>(ids.data_ptr<int64_t>() + i * L), static_cast<size_t>(L) * sizeof(int64_t));
    auto it = text_cache_.find(key);
    if (it != text_cache_.end()) {
      text_lru_.splice(text_lru_.begin(), text_lru_, it->second.lru);
      rows.push_back(it->second.value);
      continue;
    }
    torch::Tensor e = te.forward(ids.narrow(0, i, 1).to(dev));
    rows.push_back(e);
    const int64_t bytes = e.numel() * e.element_size();
    if (bytes > cfg_.text_embedding_cache_bytes) continue;
    while (text_cache_used_ + bytes > cfg_.text_embedding_cache_bytes && !text_lru_.empty()) {
      auto old = text_cache_.find(text_lru_.back());
      text_cache_used_ -= old->second.value.numel() * old->second.value.element_size();
      text_cache_.erase(old);
      text_lru_.pop_back();
    }
    text_lru_.push_front(key);
    text_cache_.emplace(std::move(key), CachedEmbedding{e, text_lru_.begin()});
    text_cache_used_ += bytes;
  }
  return torch::cat(rows, 0);
}

double Trainer::micro_step(const MicroBatch& b) {
  // A loss mask is data of the step that the graph does not take: such micro-steps run eagerly.
  torch::Tensor loss;
  if (graphs_->status().active && !b.loss_mask.defined()) {
    UnetInputs in;
    loss_for(b, true, &in);
    std::vector<torch::Tensor> ps;
    for (auto& [_, p] : params_) ps.push_back(p);
    const double grad_scale = (scaler_.enabled ? scaler_.scale : 1.0) / b.loss_divisor;
    auto fn = [this](const torch::Tensor& n, const torch::Tensor& t, const torch::Tensor& e, const torch::Tensor& y) { return unet_loss(n, t, e, y, {}, true); };
    if (auto l = graphs_->run(in.noisy, in.timesteps, in.ehs, in.target, grad_scale, ps, fn)) return *l;
    loss = unet_loss(in.noisy, in.timesteps, in.ehs, in.target, {}, true);  // warm-up or no graph for this shape
  } else {
    loss = loss_for(b, true);
  }
  torch::Tensor scaled = loss / b.loss_divisor;
  if (scaler_.enabled) scaled = scaled * scaler_.scale;
  scaled.backward();
  return loss.item<double>();
}

double Trainer::eval_loss(const MicroBatch& b) {
  torch::NoGradGuard ng;
  auto set_mode = [&](bool on) {
    pipe_->unet->train(on);
    if (cfg_.train_text_encoder) pipe_->text_encoder->train(on);
  };
  set_mode(false);
  double l;
  try {
    l = loss_for(b, false).item<double>();
  } catch (...) {
    set_mode(true);
    throw;
  }
  set_mode(true);
  return l;
}

void Trainer::zero_grad() {
  for (auto& [_, p] : params_) p.mutable_grad() = torch::Tensor();
}

StepResult Trainer::optimizer_step(double unet_lr, std::optional<double> te_lr) {
  torch::NoGradGuard ng;
  StepResult r;
  std::vector<torch::Tensor> grads;
  for (auto& [_, p] : params_) grads.push_back(p.grad().defined() ? p.grad() : torch::zeros_like(p));
  if (data_parallel.reduce_grads) data_parallel.reduce_grads(grads);
  // Non-finite gradients never reach AdamW: the step is skipped and the LR schedule holds. With fp16 that is an
  // overflow and GradScaler lowers the loss scale; in fp32/bf16 it is a diverging run (TypeScript counts and stops it).
  auto skip = [&]() {
    if (scaler_.enabled) {
      scaler_.scale *= cfg_.backoff_factor;
      scaler_.growth_tracker = 0;
    }
    zero_grad();
    r.skipped = true;
    r.non_finite = true;
    r.grad_norm = std::nan("");
    r.loss_scale = scaler_.scale;
    r.optimizer_steps = optimizer_step_count_;
    return r;
  };
  if (scaler_.enabled) {
    // GradScaler.unscale_: one fused unscale + non-finite check over all gradients, and one device sync.
    auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(pipe_->device);
    torch::Tensor found_inf = torch::zeros({1}, opts);
    torch::Tensor inv_scale = torch::full({1}, 1.0 / scaler_.scale, opts);
    at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale);
    if (found_inf.item<float>() != 0) return skip();
  }
  // clip_grad_norm_: total 2-norm over all trainable gradients; always rescales by min(1, max/(norm+1e-6)).
  // The norm is non-finite exactly when a gradient is: the check costs no extra pass or sync.
  std::vector<torch::Tensor> norms;
  for (const auto& g : grads) norms.push_back(torch::linalg_vector_norm(g, 2, {}, false, torch::kFloat32));
  torch::Tensor total = torch::linalg_vector_norm(torch::stack(norms), 2, {}, false, torch::kFloat32);
  r.grad_norm = total.item<double>();
  if (!std::isfinite(r.grad_norm)) return skip();
  if (cfg_.max_grad_norm > 0) {
    torch::Tensor coef = torch::clamp_max(cfg_.max_grad_norm / (total + 1e-6), 1.0);
    for (auto& g : grads) g.mul_(coef.to(g.scalar_type()));
  }
  // AdamW with torch.optim.AdamW's math, over all parameters at once (foreach ops: a few kernels per step instead of
  // ~8 per tensor; the CPU runs the same per-tensor kernels, so results are bit-identical to the one-tensor loop).
  // Parameters are grouped by their step count (equal unless a checkpoint says otherwise) and their param group
  // (the text encoder's has its own lr, --text-encoder-lr).
  const double b1 = cfg_.adam_beta1, b2 = cfg_.adam_beta2, eps = cfg_.adam_epsilon, wd = cfg_.adam_weight_decay;
  std::map<std::pair<int64_t, int>, std::vector<size_t>> by_step;
  for (size_t i = 0; i < params_.size(); ++i) by_step[{++steps_[params_[i].first], i >= te_params_begin_ ? 1 : 0}].push_back(i);
  for (const auto& [key, idx] : by_step) {
    const int64_t step = key.first;
    const double lr = key.second == 1 ? te_lr.value_or(unet_lr) : unet_lr;
    std::vector<torch::Tensor> ps, gs, ms, vs;
    for (size_t i : idx) {
      const auto& name = params_[i].first;
      ps.push_back(params_[i].second), gs.push_back(grads[i]), ms.push_back(exp_avg_[name]), vs.push_back(exp_avg_sq_[name]);
    }
    const double bc1 = 1 - std::pow(b1, static_cast<double>(step));
    const double bc2 = 1 - std::pow(b2, static_cast<double>(step));
    const double step_size = lr / bc1;
    if (wd != 0) at::_foreach_mul_(ps, 1 - lr * wd);
    at::_foreach_lerp_(ms, gs, 1 - b1);
    at::_foreach_mul_(vs, b2);
    at::_foreach_addcmul_(vs, gs, gs, 1 - b2);
    std::vector<torch::Tensor> denom = at::_foreach_sqrt(vs);
    at::_foreach_div_(denom, std::sqrt(bc2));
    at::_foreach_add_(denom, eps);
    at::_foreach_addcdiv_(ps, ms, denom, -step_size);
  }
  ++optimizer_step_count_;
  if (scaler_.enabled) {
    if (++scaler_.growth_tracker >= cfg_.growth_interval) {
      scaler_.scale *= cfg_.growth_factor;
      scaler_.growth_tracker = 0;
    }
  }
  zero_grad();
  r.loss_scale = scaler_.scale;
  r.optimizer_steps = optimizer_step_count_;
  return r;
}

NamedTensors Trainer::trainable_state() const {
  NamedTensors out;
  for (const auto& [name, p] : params_) out.emplace_back(name, p.detach());
  return out;
}

void Trainer::load_trainable_state(const NamedTensors& ts, const std::string& what) {
  std::map<std::string, torch::Tensor> m(ts.begin(), ts.end());
  std::vector<std::string> missing;
  for (const auto& [name, p] : params_)
    if (!m.count(name)) missing.push_back(name);
  if (!missing.empty() || m.size() != params_.size())
    throw UserError("ECKPTMISMATCH", what + ": holds " + std::to_string(m.size()) + " trainable tensors, this run has " +
                                         std::to_string(params_.size()) + (missing.empty() ? "" : " (first missing: " + missing[0] + ")") +
                                         ": the LoRA rank/targets, --train-text-encoder or the train mode differ");
  torch::NoGradGuard ng;
  for (auto& [name, p] : params_) {
    const auto& t = m[name];
    if (t.sizes() != p.sizes())
      throw UserError("ECKPTMISMATCH", what + ": " + name + " has shape " + c10::str(t.sizes()) + ", this run expects " + c10::str(p.sizes()));
    p.copy_(t);
  }
}

NamedTensors Trainer::optimizer_tensors() const {
  NamedTensors out;
  for (const auto& [name, _] : params_) {
    out.emplace_back(name + ".exp_avg", exp_avg_.at(name));
    out.emplace_back(name + ".exp_avg_sq", exp_avg_sq_.at(name));
  }
  return out;
}

std::map<std::string, int64_t> Trainer::optimizer_steps() const { return steps_; }

void Trainer::load_optimizer(const NamedTensors& ts, const std::map<std::string, int64_t>& steps, const std::string& what) {
  std::map<std::string, torch::Tensor> m(ts.begin(), ts.end());
  torch::NoGradGuard ng;
  for (const auto& [name, p] : params_) {
    for (const char* kind : {".exp_avg", ".exp_avg_sq"}) {
      auto it = m.find(name + kind);
      if (it == m.end()) throw UserError("ECKPTMISMATCH", what + ": missing optimizer state " + name + kind);
      if (it->second.sizes() != p.sizes()) throw UserError("ECKPTMISMATCH", what + ": optimizer state " + name + kind + " has the wrong shape");
      (std::string(kind) == ".exp_avg" ? exp_avg_ : exp_avg_sq_)[name].copy_(it->second);
    }
    auto s = steps.find(name);
    if (s == steps.end()) throw UserError("ECKPTMISMATCH", what + ": missing the step count of " + name);
    steps_[name] = s->second;
  }
  optimizer_step_count_ = steps_.empty() ? 0 : steps_.begin()->second;
}

std::vector<std::pair<std::string, std::vector<uint8_t>>> Trainer::rng_state() const {
  std::vector<std::pair<std::string, std::vector<uint8_t>>> out;
  auto grab = [&](const std::string& name, at::Generator gen) {
    std::lock_guard<std::mutex> lock(gen.mutex());
    torch::Tensor s = gen.get_state();
    out.emplace_back(name, std::vector<uint8_t>(s.data_ptr<uint8_t>(), s.data_ptr<uint8_t>() + s.numel()));
  };
  grab("cpu", at::globalContext().defaultGenerator(at::kCPU));
  if (torch::cuda::is_available())
    for (int64_t i = 0; i < static_cast<int64_t>(torch::cuda::device_count()); ++i)
      grab("cuda:" + std::to_string(i), at::globalContext().defaultGenerator(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(i))));
  if (at::hasMPS()) grab("mps", at::globalContext().defaultGenerator(at::Device(at::kMPS)));
  return out;
}

void Trainer::set_rng_state(const std::vector<std::pair<std::string, std::vector<uint8_t>>>& states) {
  for (const auto& [name, bytes] : states) {
    at::Device d(name);
    // A stream of a device this machine lacks (a bigger machine, another device type) is not restored; the caller
    // compares the checkpoint's streams with rng_state() and says what cannot continue bit-exactly.
    if (d.is_cuda() && (!torch::cuda::is_available() || d.index() >= static_cast<int64_t>(torch::cuda::device_count())))
      continue;
    if (d.is_mps() && !at::hasMPS()) continue;
    auto gen = at::globalContext().defaultGenerator(d);
    torch::Tensor s = torch::empty({static_cast<int64_t>(bytes.size())}, torch::kUInt8);
    std::memcpy(s.data_ptr<uint8_t>(), bytes.data(), bytes.size());
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(s);
  }
}

std::optional<at::ScalarType> Trainer::autocast_dtype() const {
  if (cfg_.mixed_precision == MixedPrecision::FP16) return torch::kFloat16;
  if (cfg_.mixed_precision == MixedPrecision::BF16) return torch::kBFloat16;
  return std::nullopt;
}

int64_t Trainer::trainable_count() const {
  int64_t n = 0;
  for (const auto& [_, p] : params_) n += p.numel();
  return n;
}

int64_t Trainer::total_count() const {
  int64_t n = 0;
  for (auto* m : {static_cast<torch::nn::Module*>(pipe_->unet.get()), static_cast<torch::nn::Module*>(pipe_->vae.get()),
                  static_cast<torch::nn::Module*>(pipe_->text_encoder.get())})
    if (m)
      for (const auto& p : m->parameters(true)) n += p.numel();
  return n;
}

}  // namespace tl
