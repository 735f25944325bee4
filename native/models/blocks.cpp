#include "models/blocks.h"

#include <cmath>

namespace tl {

const std::vector<std::pair<std::string, Activation>> kActivations = {
    {"silu", Activation::SiLU}, {"swish", Activation::SiLU}, {"mish", Activation::Mish}, {"gelu", Activation::GELU}, {"relu", Activation::ReLU}};

const std::vector<std::pair<std::string, Activation>> kTransformersActivations = {
    {"quick_gelu", Activation::QuickGELU},     {"gelu", Activation::GELU},          {"gelu_python", Activation::GELU},
    {"gelu_new", Activation::GELUNew},         {"gelu_fast", Activation::GELUFast}, {"gelu_pytorch_tanh", Activation::GELUTanh},
    {"gelu_python_tanh", Activation::GELUNew}, {"relu", Activation::ReLU},          {"silu", Activation::SiLU},
    {"swish", Activation::SiLU}};

torch::Tensor activate(Activation act, const torch::Tensor& x) {
  switch (act) {
    case Activation::SiLU: return at::silu(x);
    case Activation::Mish: return at::mish(x);
    case Activation::GELU: return at::gelu(x);
    case Activation::ReLU: return at::relu(x);
    case Activation::GELUTanh: return at::gelu(x, "tanh");
    case Activation::GELUNew: return 0.5 * x * (1.0 + at::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * at::pow(x, 3.0))));
    case Activation::GELUFast: return 0.5 * x * (1.0 + at::tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)));
    case Activation::QuickGELU: return x * at::sigmoid(1.702 * x);
  }
  return x;
}

ResnetBlock2D::ResnetBlock2D(int64_t in, int64_t out, int64_t temb_channels, int64_t groups, double eps, Activation act_, double osf)
    : act(act_), output_scale_factor(osf) {
  norm1 = register_module("norm1", std::make_shared<nn::GroupNorm>(groups, in, eps));
  conv1 = register_module("conv1", std::make_shared<nn::Conv2d>(in, out, 3, 1, 1));
  if (temb_channels > 0) time_emb_proj = register_module("time_emb_proj", std::make_shared<nn::Linear>(temb_channels, out));
  norm2 = register_module("norm2", std::make_shared<nn::GroupNorm>(groups, out, eps));
  conv2 = register_module("conv2", std::make_shared<nn::Conv2d>(out, out, 3, 1, 1));
  if (in != out) conv_shortcut = register_module("conv_shortcut", std::make_shared<nn::Conv2d>(in, out, 1, 1, 0));
}

torch::Tensor ResnetBlock2D::forward(const torch::Tensor& x, const torch::Tensor& temb) const {
  torch::Tensor h = conv1->forward(activate(act, norm1->forward(x)));
  if (time_emb_proj && temb.defined()) {
    torch::Tensor t = time_emb_proj->forward(activate(act, temb));
    h = h + t.unsqueeze(-1).unsqueeze(-1);
  }
  h = conv2->forward(activate(act, norm2->forward(h)));
  torch::Tensor out = (conv_shortcut ? conv_shortcut->forward(x) : x) + h;
  return output_scale_factor == 1.0 ? out : out / output_scale_factor;
}

Sampler2D::Sampler2D(int64_t channels, bool down_, int64_t padding_) : down(down_), padding(padding_) {
  conv = register_module("conv", std::make_shared<nn::Conv2d>(channels, channels, 3, down ? 2 : 1, down ? padding : 1));
}

torch::Tensor Sampler2D::forward(const torch::Tensor& x, std::optional<std::vector<int64_t>> size) const {
  if (down) {
    if (padding == 0) return conv->forward(at::constant_pad_nd(x, {0, 1, 0, 1}, 0));
    return conv->forward(x);
  }
  // diffusers makes large batches contiguous before upsample_nearest2d (a kernel limit); values are the same.
  torch::Tensor h = x.size(0) >= 64 ? x.contiguous() : x;
  if (size) h = at::upsample_nearest2d(h, *size);
  else h = at::upsample_nearest2d(h, {x.size(2) * 2, x.size(3) * 2});
  return conv->forward(h);
}

}  // namespace tl
