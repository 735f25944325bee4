// Building blocks shared by the model files. Every module registers its parameters under the names diffusers
// and transformers use, so a checkpoint loads by a straight map from name to parameter (see weights.h).
// Parameters are created with torch::empty (no initialization cost): they are always either loaded from a
// file or filled by init_random().
#pragma once
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tl::nn {

using torch::Tensor;
using ModulePtr = std::shared_ptr<torch::nn::Module>;

// A list of typed children registered as a torch::nn::ModuleList, so their names are "<list>.<index>...".
template <class T>
struct Children {
  torch::nn::ModuleList holder;
  std::vector<std::shared_ptr<T>> items;
  Children() : holder(torch::nn::ModuleList()) {}
  void push(std::shared_ptr<T> m) {
    holder->push_back(m);
    items.push_back(std::move(m));
  }
  size_t size() const { return items.size(); }
  bool empty() const { return items.empty(); }
  T& operator[](size_t i) const { return *items[i]; }
  auto begin() const { return items.begin(); }
  auto end() const { return items.end(); }
};


struct GroupNorm : torch::nn::Module {
  Tensor weight, bias;
  int64_t groups;
  double eps;
  GroupNorm(int64_t groups, int64_t channels, double eps);
  Tensor forward(const Tensor& x) const;
};

struct LayerNorm : torch::nn::Module {
  Tensor weight, bias;
  int64_t dim;
  double eps;
  LayerNorm(int64_t dim, double eps);
  Tensor forward(const Tensor& x) const;
};

struct Embedding : torch::nn::Module {
  Tensor weight;
  Embedding(int64_t num, int64_t dim);
  Tensor forward(const Tensor& ids) const;
};

struct LoraOptions {
  int64_t rank = 4;
  double alpha = 4;
  double dropout = 0;
  std::string init = "gaussian";  // gaussian (A ~ N(0, 1/r), B = 0) | kaiming (peft's default) | zeros (both zero, filled later)
};

// A LoRA adapter on a layer (peft semantics; the state shared by Linear and Conv2d):
//   y = base(x) + up(down(dropout(x))) * (alpha / r) * multiplier
// LoRA weights live in "lora_A.weight" and "lora_B.weight", always fp32 (the input is cast to their dtype and the
// sum back to the base output's dtype, as peft does). Linear: A [r, in], B [out, r]. Conv2d (LoCon, kohya's and
// peft's shapes): A [r, in, k, k] with the base conv's stride and padding, B [out, r, 1, 1].
struct LoraLayer {
  std::shared_ptr<torch::nn::Module> lora_A_mod, lora_B_mod;  // hold "weight" each
  Tensor lora_A, lora_B;
  LoraOptions lora;
  double lora_multiplier = 1.0;  // inference strength (--lora-scale); 1 in training
  virtual ~LoraLayer() = default;
  bool has_lora() const { return lora_A.defined(); }
  void add_lora(const LoraOptions& opts, torch::Device device);
  double lora_scale() const { return lora.alpha / static_cast<double>(lora.rank); }
  // Folds the adapter into the base weight (for --merge exports) and removes it.
  void merge_lora();
  // The shapes of A and B for rank r; the base weight.
  virtual std::vector<int64_t> lora_A_shape(int64_t r) const = 0;
  virtual std::vector<int64_t> lora_B_shape(int64_t r) const = 0;
  virtual Tensor base_weight() const = 0;
  // "Linear" or "Conv2d", and the shape of the base weight in words, for messages.
  virtual std::string kind() const = 0;

 protected:
  virtual torch::nn::Module& lora_owner() = 0;
};

// nn.Linear, optionally with a LoRA adapter.
struct Linear : torch::nn::Module, LoraLayer {
  Tensor weight, bias;
  int64_t in_features, out_features;
  Linear(int64_t in, int64_t out, bool has_bias = true);
  Tensor forward(const Tensor& x) const;
  std::vector<int64_t> lora_A_shape(int64_t r) const override { return {r, in_features}; }
  std::vector<int64_t> lora_B_shape(int64_t r) const override { return {out_features, r}; }
  Tensor base_weight() const override { return weight; }
  std::string kind() const override { return "Linear"; }

 protected:
  torch::nn::Module& lora_owner() override { return *this; }
};

// nn.Conv2d (square kernel, same stride and padding on both axes), optionally with a LoRA adapter.
struct Conv2d : torch::nn::Module, LoraLayer {
  Tensor weight, bias;
  int64_t in_channels, out_channels, kernel, stride, padding;
  Conv2d(int64_t in, int64_t out, int64_t kernel, int64_t stride = 1, int64_t padding = 0, bool has_bias = true);
  Tensor forward(const Tensor& x) const;
  std::vector<int64_t> lora_A_shape(int64_t r) const override { return {r, in_channels, kernel, kernel}; }
  std::vector<int64_t> lora_B_shape(int64_t r) const override { return {out_channels, r, 1, 1}; }
  Tensor base_weight() const override { return weight; }
  std::string kind() const override { return "Conv2d"; }

 protected:
  torch::nn::Module& lora_owner() override { return *this; }
};

// The LoRA update of a weight: scale * B @ A in fp32 (scale = alpha / r * multiplier); merge_lora and the merged
// exports (lora_export.cpp) both fold it into W this way. For a conv adapter (A [r, in, k, k], B [out, r, 1, 1]) the
// update is B[:, :, 0, 0] @ A.flatten(1) shaped [out, in, k, k] (exact: the 1x1 up conv commutes with stride/padding).
Tensor lora_delta(const Tensor& B, const Tensor& A, double scale);

// diffusers' Attention with AttnProcessor2_0 (scaled_dot_product_attention), for [B, N, C] inputs, or
// [B, C, H, W] when it carries its own group_norm (the VAE mid-block form, with a residual connection).
struct Attention : torch::nn::Module {
  int64_t heads, dim_head;
  bool residual_connection;
  // diffusers' upcast_attention: when q/k/v come out in fp16/bf16 (weights or autocast), attention is computed in
  // fp32 and cast back (scores and softmax cannot overflow). A no-op in fp32.
  bool upcast = false;
  double rescale_output_factor;
  std::shared_ptr<GroupNorm> group_norm;  // optional
  std::shared_ptr<Linear> to_q, to_k, to_v;
  Children<Linear> to_out;
  Attention(int64_t query_dim, int64_t cross_dim, int64_t heads, int64_t dim_head, bool qkv_bias, bool out_bias,
            int64_t norm_groups = 0, double norm_eps = 1e-6, bool residual = false, double rescale = 1.0);
  Tensor forward(const Tensor& x, const Tensor& context = Tensor()) const;
};

// Scaled dot-product attention over [B, N, C] projections split into `heads`.
Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads, bool causal = false);

// Mixed precision as torch.autocast(device_type, dtype): inside the scope, matmuls, convolutions and attention run
// in `dtype` (fp16 or bf16) on whatever dtype the weights have (fp32 master weights stay fp32); reductions and
// norms stay in fp32 (libtorch's autocast op lists). Restores the previous state on exit and clears the cast cache
// when the outermost scope closes, as torch.autocast's __exit__ does. `dtype` nullopt: a no-op scope.
class AutocastScope {
 public:
  AutocastScope(c10::DeviceType device, std::optional<at::ScalarType> dtype);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType device_;
  bool active_ = false, prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kFloat;
};

// The autocast state of the device types training runs on, captured where a computation starts so that it can be
// replayed later on another call stack (checkpointed segments recompute in backward, outside the forward's scope).
struct AutocastState {
  std::vector<std::pair<c10::DeviceType, at::ScalarType>> enabled;
  static AutocastState current();
};

// Activation checkpointing: runs fn without keeping activations and recomputes it in backward (reentrant,
// like torch.utils.checkpoint(use_reentrant=True)), restoring the RNG so dropout masks match, and the autocast
// state of the forward so the recomputed activations have the forward's dtypes.
using CheckpointFn = std::function<std::vector<Tensor>(const std::vector<Tensor>&)>;
std::vector<Tensor> checkpoint(const CheckpointFn& fn, const std::vector<Tensor>& inputs);

// Deterministic random initialization by parameter name (for generated test models): norms weight 1, biases 0,
// embeddings N(0, 0.02), everything else U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as torch's default init does.
void init_random(torch::nn::Module& m, uint64_t seed);

}  // namespace tl::nn
