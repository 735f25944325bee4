#include "models/nn.h"

#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

namespace tl::nn {
namespace F = torch::nn::functional;

namespace {
Tensor empty_param(torch::IntArrayRef shape) { return torch::empty(shape); }
}  // namespace

Conv2d::Conv2d(int64_t in, int64_t out, int64_t kernel_, int64_t stride_, int64_t padding_, bool has_bias)
    : in_channels(in), out_channels(out), kernel(kernel_), stride(stride_), padding(padding_) {
  weight = register_parameter("weight", empty_param({out, in, kernel, kernel}));
  if (has_bias) bias = register_parameter("bias", empty_param({out}));
}

Tensor Conv2d::forward(const Tensor& x) const {
  Tensor y = at::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
  if (!lora_A.defined() || lora_multiplier == 0.0) return y;
  Tensor xl = x.to(lora_A.scalar_type());
  if (lora.dropout > 0 && is_training()) xl = at::dropout(xl, lora.dropout, true);
  Tensor delta = at::conv2d(at::conv2d(xl, lora_A, {}, {stride, stride}, {padding, padding}), lora_B) * (lora_scale() * lora_multiplier);
  return (y + delta).to(y.scalar_type());
}

GroupNorm::GroupNorm(int64_t groups_, int64_t channels, double eps_) : groups(groups_), eps(eps_) {
  if (channels % groups != 0)
    throw std::invalid_argument("GroupNorm: " + std::to_string(channels) + " channels are not divisible by " +
                                std::to_string(groups) + " groups (norm_num_groups)");
  weight = register_parameter("weight", empty_param({channels}));
  bias = register_parameter("bias", empty_param({channels}));
}

Tensor GroupNorm::forward(const Tensor& x) const { return at::group_norm(x, groups, weight, bias, eps); }

LayerNorm::LayerNorm(int64_t dim_, double eps_) : dim(dim_), eps(eps_) {
  weight = register_parameter("weight", empty_param({dim}));
  bias = register_parameter("bias", empty_param({dim}));
}

Tensor LayerNorm::forward(const Tensor& x) const { return at::layer_norm(x, {dim}, weight, bias, eps); }

Embedding::Embedding(int64_t num, int64_t dim) { weight = register_parameter("weight", empty_param({num, dim})); }

Tensor Embedding::forward(const Tensor& ids) const { return at::embedding(weight, ids); }

Linear::Linear(int64_t in, int64_t out, bool has_bias) : in_features(in), out_features(out) {
  weight = register_parameter("weight", empty_param({out, in}));
  if (has_bias) bias = register_parameter("bias", empty_param({out}));
}

Tensor Linear::forward(const Tensor& x) const {
  Tensor y = at::linear(x, weight, bias);
  if (!lora_A.defined() || lora_multiplier == 0.0) return y;
  Tensor xl = x.to(lora_A.scalar_type());
  if (lora.dropout > 0 && is_training()) xl = at::dropout(xl, lora.dropout, true);
  Tensor delta = at::linear(at::linear(xl, lora_A), lora_B) * (lora_scale() * lora_multiplier);
  return (y + delta).to(y.scalar_type());
}

void LoraLayer::add_lora(const LoraOptions& opts, torch::Device device) {
  if (lora_A.defined()) throw std::logic_error("LoRA already added to this " + kind());
  if (opts.rank <= 0) throw std::invalid_argument("LoRA rank must be positive");
  lora = opts;
  auto opt = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  auto& owner = lora_owner();
  lora_A_mod = owner.register_module("lora_A", std::make_shared<torch::nn::Module>());
  lora_B_mod = owner.register_module("lora_B", std::make_shared<torch::nn::Module>());
  const auto a_shape = lora_A_shape(opts.rank);
  Tensor a = torch::empty(a_shape, opt);
  Tensor b = torch::zeros(lora_B_shape(opts.rank), opt);
  {
    torch::NoGradGuard ng;
    if (opts.init == "gaussian") {
      a.normal_(0.0, 1.0 / static_cast<double>(opts.rank));
    } else if (opts.init == "kaiming" || opts.init == "true") {
      // nn.init.kaiming_uniform_(a=sqrt(5)): bound = 1/sqrt(fan_in), fan_in = in (Linear) or in * k * k (Conv2d)
      const int64_t fan_in = a.numel() / a_shape[0];
      double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
      a.uniform_(-bound, bound);
    } else if (opts.init == "zeros") {
      a.zero_();
    } else {
      throw std::invalid_argument("unknown LoRA init \"" + opts.init + "\" (gaussian, kaiming, zeros)");
    }
  }
  lora_A = lora_A_mod->register_parameter("weight", a);
  lora_B = lora_B_mod->register_parameter("weight", b);
}

Tensor lora_delta(const Tensor& B, const Tensor& A, double scale) {
  if (A.dim() == 4) {
    Tensor d = at::matmul(B.to(torch::kFloat32).flatten(1), A.to(torch::kFloat32).flatten(1)) * scale;
    return d.view({B.size(0), A.size(1), A.size(2), A.size(3)});
  }
  return at::matmul(B.to(torch::kFloat32), A.to(torch::kFloat32)) * scale;
}

void LoraLayer::merge_lora() {
  if (!lora_A.defined()) return;
  torch::NoGradGuard ng;
  Tensor weight = base_weight();
  Tensor delta = lora_delta(lora_B, lora_A, lora_scale() * lora_multiplier);
  weight.copy_((weight.to(torch::kFloat32) + delta.to(weight.device())).to(weight.scalar_type()));
  auto& owner = lora_owner();
  owner.unregister_module("lora_A");
  owner.unregister_module("lora_B");
  lora_A_mod.reset();
  lora_B_mod.reset();
  lora_A = Tensor();
  lora_B = Tensor();
}

Attention::Attention(int64_t query_dim, int64_t cross_dim, int64_t heads_, int64_t dim_head_, bool qkv_bias,
                     bool out_bias, int64_t norm_groups, double norm_eps, bool residual, double rescale)
    : heads(heads_), dim_head(dim_head_), residual_connection(residual), rescale_output_factor(rescale) {
  int64_t inner = heads * dim_head;
  if (cross_dim <= 0) cross_dim = query_dim;
  if (norm_groups > 0) group_norm = register_module("group_norm", std::make_shared<GroupNorm>(norm_groups, query_dim, norm_eps));
  to_q = register_module("to_q", std::make_shared<Linear>(query_dim, inner, qkv_bias));
  to_k = register_module("to_k", std::make_shared<Linear>(cross_dim, inner, qkv_bias));
  to_v = register_module("to_v", std::make_shared<Linear>(cross_dim, inner, qkv_bias));
  to_out.push(std::make_shared<Linear>(inner, query_dim, out_bias));
  register_module("to_out", to_out.holder);
}

Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads, bool causal) {
  const int64_t b = q.size(0), nq = q.size(1), nk = k.size(1), inner = q.size(2), d = inner / heads;
  auto split = [&](const Tensor& t, int64_t n) { return t.view({b, n, heads, d}).transpose(1, 2); };
  Tensor o = at::scaled_dot_product_attention(split(q, nq), split(k, nk), split(v, nk), {}, 0.0, causal);
  return o.transpose(1, 2).reshape({b, nq, inner});
}

Tensor Attention::forward(const Tensor& x, const Tensor& context) const {
  Tensor h = x;
  const bool spatial = x.dim() == 4;
  int64_t B = 0, C = 0, H = 0, W = 0;
  if (spatial) {
    B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    h = x.view({B, C, H * W}).transpose(1, 2);
  }
  if (group_norm) h = group_norm->forward(h.transpose(1, 2)).transpose(1, 2);
  const Tensor& ctx = context.defined() ? context : h;
  Tensor q = to_q->forward(h), k = to_k->forward(ctx), v = to_v->forward(ctx);
  Tensor out;
  if (upcast && (q.scalar_type() == torch::kHalf || q.scalar_type() == torch::kBFloat16)) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    out = multi_head_attention(q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat), heads).to(q.scalar_type());
  } else {
    out = multi_head_attention(q, k, v, heads);
  }
  out = to_out[0].forward(out);
  if (spatial) out = out.transpose(-1, -2).reshape({B, C, H, W});
  if (residual_connection) out = out + x;
  if (rescale_output_factor != 1.0) out = out / rescale_output_factor;
  return out;
}

// ---- mixed precision ----
AutocastScope::AutocastScope(c10::DeviceType device, std::optional<at::ScalarType> dtype) : device_(device) {
  if (!dtype) return;
  active_ = true;
  prev_enabled_ = at::autocast::is_autocast_enabled(device_);
  prev_dtype_ = at::autocast::get_autocast_dtype(device_);
  at::autocast::set_autocast_enabled(device_, true);
  at::autocast::set_autocast_dtype(device_, *dtype);
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_, prev_enabled_);
  at::autocast::set_autocast_dtype(device_, prev_dtype_);
}

AutocastState AutocastState::current() {
  AutocastState s;
  for (auto d : {c10::DeviceType::CPU, c10::DeviceType::CUDA, c10::DeviceType::MPS})
    if (at::autocast::is_autocast_enabled(d)) s.enabled.emplace_back(d, at::autocast::get_autocast_dtype(d));
  return s;
}

// ---- activation checkpointing ----
namespace {

struct FnCapsule : torch::CustomClassHolder {
  CheckpointFn fn;
  std::vector<std::pair<at::Device, Tensor>> rng_states;
  AutocastState autocast;
};

std::vector<at::Device> rng_devices(const std::vector<Tensor>& inputs) {
  std::vector<at::Device> devs{at::Device(at::kCPU)};
  for (const auto& t : inputs)
    if (t.defined() && t.is_cuda() && std::find(devs.begin(), devs.end(), t.device()) == devs.end()) devs.push_back(t.device());
  return devs;
}

Tensor get_rng(const at::Device& d) {
  auto gen = at::globalContext().defaultGenerator(d);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng(const at::Device& d, const Tensor& s) {
  auto gen = at::globalContext().defaultGenerator(d);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(s);
}

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  // The inputs come as a TensorList: autograd only sees tensors passed as Tensor or TensorList (a
  // std::vector argument is taken for a non-tensor, and then no graph is built at all).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, c10::intrusive_ptr<FnCapsule> cap,
                                                at::TensorList input_list) {
    torch::autograd::variable_list inputs(input_list.begin(), input_list.end());
    for (const auto& d : rng_devices(inputs)) cap->rng_states.emplace_back(d, get_rng(d));
    cap->autocast = AutocastState::current();
    ctx->saved_data["fn"] = c10::IValue::make_capsule(c10::intrusive_ptr<torch::CustomClassHolder>(cap));
    ctx->save_for_backward(inputs);
    torch::NoGradGuard ng;
    return cap->fn(inputs);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto cap = c10::static_intrusive_pointer_cast<FnCapsule>(ctx->saved_data["fn"].toCapsule());
    auto saved = ctx->get_saved_variables();
    std::vector<Tensor> detached;
    for (const auto& t : saved) {
      if (!t.defined()) {
        detached.push_back(t);
        continue;
      }
      Tensor d = t.detach();
      d.set_requires_grad(t.requires_grad());
      detached.push_back(d);
    }
    // Replay the forward's RNG, then put the current RNG back.
    std::vector<std::pair<at::Device, Tensor>> now;
    for (const auto& [d, s] : cap->rng_states) {
      now.emplace_back(d, get_rng(d));
      set_rng(d, s);
    }
    std::vector<Tensor> outputs;
    {
      torch::AutoGradMode g(true);
      // The forward's autocast scopes (backward runs outside them): at most one device type in practice.
      std::vector<std::unique_ptr<AutocastScope>> scopes;
      for (const auto& [dev, dt] : cap->autocast.enabled) scopes.push_back(std::make_unique<AutocastScope>(dev, dt));
      outputs = cap->fn(detached);
    }
    for (const auto& [d, s] : now) set_rng(d, s);
    std::vector<Tensor> outs, grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].requires_grad() && i < grad_outputs.size() && grad_outputs[i].defined()) {
        outs.push_back(outputs[i]);
        grads.push_back(grad_outputs[i]);
      }
    }
    if (!outs.empty()) torch::autograd::backward(outs, grads);
    torch::autograd::variable_list result;
    result.push_back(Tensor());  // for the capsule argument
    for (const auto& d : detached) result.push_back(d.defined() && d.requires_grad() ? d.grad() : Tensor());
    return result;
  }
};

}  // namespace

std::vector<Tensor> checkpoint(const CheckpointFn& fn, const std::vector<Tensor>& inputs) {
  if (!torch::GradMode::is_enabled()) return fn(inputs);
  auto cap = c10::make_intrusive<FnCapsule>();
  cap->fn = fn;
  // Like non-reentrant checkpointing (what diffusers uses): the segment must join the graph even when no input
  // requires grad (e.g. the first block after a frozen conv_in), or the trainable weights inside get no gradient.
  bool any = false;
  for (const auto& t : inputs) any = any || (t.defined() && t.requires_grad());
  if (!any) {
    std::vector<Tensor> ins = inputs;
    for (auto& t : ins)
      if (t.defined() && t.is_floating_point()) {
        t = t.detach().requires_grad_(true);
        break;
      }
    return CheckpointFunction::apply(cap, at::TensorList(ins));
  }
  return CheckpointFunction::apply(cap, at::TensorList(inputs));
}

void init_random(torch::nn::Module& m, uint64_t seed) {
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (auto& p : m.named_parameters(true)) {
    const std::string& name = p.key();
    Tensor t = p.value();
    auto ends_with = [&](const std::string& s) { return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0; };
    bool is_norm = name.find("norm") != std::string::npos;
    Tensor v = torch::empty(t.sizes(), torch::kFloat32);
    if (ends_with("bias")) {
      v.zero_();
    } else if (is_norm && t.dim() == 1) {
      v.fill_(1.0);
    } else if (name.find("embedding") != std::string::npos) {
      v.normal_(0.0, 0.02, gen);
    } else {
      int64_t fan_in = t.dim() > 1 ? t.numel() / t.size(0) : t.numel();
      double bound = 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(fan_in, 1)));
      v.uniform_(-bound, bound, gen);
    }
    if (t.numel() == 0 || t.data_ptr() == nullptr) t.set_data(v.to(t.options()));
    else t.copy_(v);
  }
}

}  // namespace tl::nn
