#include "models/vae.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>

#include "models/config.h"
#include "runtime/engine.h"
#include "io/weights.h"

namespace tl {
namespace {

using torch::Tensor;

constexpr double kEps = 1e-6;  // resnet_eps / GroupNorm eps everywhere in diffusers' Encoder and Decoder

const std::vector<std::string> kDownBlocks = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"};
const std::vector<std::string> kUpBlocks = {"UpDecoderBlock2D", "AttnUpDecoderBlock2D"};


}  // namespace

AutoencoderKLConfig AutoencoderKLConfig::from_json(const Json& j, const std::string& path) {
  ConfigReader r(j, path);
  r.require_class("AutoencoderKL");
  AutoencoderKLConfig c;
  c.in_channels = r.integer("in_channels", c.in_channels, 1);
  c.out_channels = r.integer("out_channels", c.out_channels, 1);
  c.latent_channels = r.integer("latent_channels", c.latent_channels, 1);
  c.block_out_channels = r.int_list("block_out_channels", c.block_out_channels, 1);
  if (c.block_out_channels.empty()) r.fail("block_out_channels", "must not be empty");
  c.layers_per_block = r.integer("layers_per_block", c.layers_per_block, 1);
  c.norm_num_groups = r.integer("norm_num_groups", c.norm_num_groups, 1);
  c.act_fn = r.enumerated("act_fn", c.act_fn, kActivations, /*fold_case=*/true);
  if (r.present("sample_size") && r.raw("sample_size").is_array() && !r.raw("sample_size").as_array().empty() &&
      ConfigReader::is_integer(r.raw("sample_size").as_array()[0]))
    c.sample_size = r.raw("sample_size").as_array()[0].as_int();
  else
    c.sample_size = r.integer("sample_size", c.sample_size, 1);
  c.scaling_factor = r.positive("scaling_factor", c.scaling_factor);
  if (r.present("shift_factor")) c.shift_factor = r.number("shift_factor", 0.0);
  c.latents_mean = r.numbers_opt("latents_mean");
  c.latents_std = r.numbers_opt("latents_std");
  c.force_upcast = r.boolean("force_upcast", c.force_upcast);
  c.use_quant_conv = r.boolean("use_quant_conv", c.use_quant_conv);
  c.use_post_quant_conv = r.boolean("use_post_quant_conv", c.use_post_quant_conv);
  c.mid_block_add_attention = r.boolean("mid_block_add_attention", c.mid_block_add_attention);
  c.down_block_types = r.choices("down_block_types", c.down_block_types, kDownBlocks);
  c.up_block_types = r.choices("up_block_types", c.up_block_types, kUpBlocks);

  const size_t n = c.block_out_channels.size();
  for (const char* key : {"down_block_types", "up_block_types"}) {
    size_t m = std::string(key) == "down_block_types" ? c.down_block_types.size() : c.up_block_types.size();
    if (m != n)
      r.fail(key, "has " + std::to_string(m) + " entries but block_out_channels has " + std::to_string(n) +
                                  " (one block per entry)");
  }
  for (int64_t ch : c.block_out_channels)
    if (ch % c.norm_num_groups != 0)
      r.fail("norm_num_groups",
                   std::to_string(c.norm_num_groups) + " does not divide block_out_channels entry " + std::to_string(ch));
  return c;
}

namespace vae {

namespace {
// The VAE's single-head spatial attention: heads = C / attention_head_dim = 1, dim_head = C, GroupNorm on the
// input, bias everywhere, residual connection, rescale 1.
std::shared_ptr<nn::Attention> vae_attention(int64_t channels, int64_t groups) {
  return std::make_shared<nn::Attention>(channels, 0, 1, channels, true, true, groups, kEps, true, 1.0);
}
}  // namespace

SampleBlock::SampleBlock(int64_t in, int64_t out, int64_t num_layers, bool attention, bool down, bool up, int64_t groups,
                         Activation act) {
  for (int64_t i = 0; i < num_layers; ++i) {
    resnets.push(std::make_shared<ResnetBlock2D>(i == 0 ? in : out, out, 0, groups, kEps, act));
    if (attention) attentions.push(vae_attention(out, groups));
  }
  if (attention) register_module("attentions", attentions.holder);
  register_module("resnets", resnets.holder);
  if (down) {
    downsamplers.push(std::make_shared<Sampler2D>(out, true, 0));
    register_module("downsamplers", downsamplers.holder);
  }
  if (up) {
    upsamplers.push(std::make_shared<Sampler2D>(out, false, 1));
    register_module("upsamplers", upsamplers.holder);
  }
}

Tensor SampleBlock::forward(const Tensor& x) const {
  Tensor h = x;
  for (size_t i = 0; i < resnets.size(); ++i) {
    h = resnets[i].forward(h);
    if (!attentions.empty()) h = attentions[i].forward(h);
  }
  for (const auto& d : downsamplers) h = d->forward(h);
  for (const auto& u : upsamplers) h = u->forward(h);
  return h;
}

MidBlock2D::MidBlock2D(int64_t channels, int64_t groups, Activation act, bool add_attention) {
  resnets.push(std::make_shared<ResnetBlock2D>(channels, channels, 0, groups, kEps, act));
  if (add_attention) attentions.push(vae_attention(channels, groups));
  resnets.push(std::make_shared<ResnetBlock2D>(channels, channels, 0, groups, kEps, act));
  if (add_attention) register_module("attentions", attentions.holder);
  register_module("resnets", resnets.holder);
}

Tensor MidBlock2D::forward(const Tensor& x) const {
  Tensor h = resnets[0].forward(x);
  if (!attentions.empty()) h = attentions[0].forward(h);
  return resnets[1].forward(h);
}

Encoder::Encoder(const AutoencoderKLConfig& cfg) {
  const auto& boc = cfg.block_out_channels;
  const int64_t g = cfg.norm_num_groups;
  conv_in = register_module("conv_in", std::make_shared<nn::Conv2d>(cfg.in_channels, boc[0], 3, 1, 1));
  int64_t output_channel = boc[0];
  for (size_t i = 0; i < cfg.down_block_types.size(); ++i) {
    int64_t input_channel = output_channel;
    output_channel = boc[i];
    const bool is_final = i == boc.size() - 1;
    const bool attn = cfg.down_block_types[i] == "AttnDownEncoderBlock2D";
    down_blocks.push(std::make_shared<SampleBlock>(input_channel, output_channel, cfg.layers_per_block, attn, !is_final, false, g,
                                                   cfg.act_fn));
  }
  register_module("down_blocks", down_blocks.holder);
  mid_block = register_module("mid_block", std::make_shared<MidBlock2D>(boc.back(), g, cfg.act_fn, cfg.mid_block_add_attention));
  conv_norm_out = register_module("conv_norm_out", std::make_shared<nn::GroupNorm>(g, boc.back(), kEps));
  conv_out = register_module("conv_out", std::make_shared<nn::Conv2d>(boc.back(), 2 * cfg.latent_channels, 3, 1, 1));
}

Tensor Encoder::forward(const Tensor& x) const {
  Tensor h = conv_in->forward(x);
  for (const auto& b : down_blocks) h = b->forward(h);
  h = mid_block->forward(h);
  return conv_out->forward(at::silu(conv_norm_out->forward(h)));  // conv_act is always nn.SiLU, whatever act_fn says
}

Decoder::Decoder(const AutoencoderKLConfig& cfg) {
  const auto& boc = cfg.block_out_channels;
  const int64_t g = cfg.norm_num_groups;
  conv_in = register_module("conv_in", std::make_shared<nn::Conv2d>(cfg.latent_channels, boc.back(), 3, 1, 1));
  mid_block = register_module("mid_block", std::make_shared<MidBlock2D>(boc.back(), g, cfg.act_fn, cfg.mid_block_add_attention));
  std::vector<int64_t> rev(boc.rbegin(), boc.rend());
  int64_t output_channel = rev[0];
  for (size_t i = 0; i < cfg.up_block_types.size(); ++i) {
    int64_t prev_output_channel = output_channel;
    output_channel = rev[i];
    const bool is_final = i == boc.size() - 1;
    const bool attn = cfg.up_block_types[i] == "AttnUpDecoderBlock2D";
    up_blocks.push(std::make_shared<SampleBlock>(prev_output_channel, output_channel, cfg.layers_per_block + 1, attn, false,
                                                 !is_final, g, cfg.act_fn));
  }
  register_module("up_blocks", up_blocks.holder);
  conv_norm_out = register_module("conv_norm_out", std::make_shared<nn::GroupNorm>(g, boc[0], kEps));
  conv_out = register_module("conv_out", std::make_shared<nn::Conv2d>(boc[0], cfg.out_channels, 3, 1, 1));
}

Tensor Decoder::forward(const Tensor& z) const {
  Tensor h = conv_in->forward(z);
  h = mid_block->forward(h);
  for (const auto& b : up_blocks) h = b->forward(h);
  return conv_out->forward(at::silu(conv_norm_out->forward(h)));
}

}  // namespace vae

AutoencoderKL::AutoencoderKL(const AutoencoderKLConfig& cfg) : config(cfg) {
  encoder = register_module("encoder", std::make_shared<vae::Encoder>(cfg));
  decoder = register_module("decoder", std::make_shared<vae::Decoder>(cfg));
  const int64_t lc = cfg.latent_channels;
  if (cfg.use_quant_conv) quant_conv = register_module("quant_conv", std::make_shared<nn::Conv2d>(2 * lc, 2 * lc, 1, 1, 0));
  if (cfg.use_post_quant_conv) post_quant_conv = register_module("post_quant_conv", std::make_shared<nn::Conv2d>(lc, lc, 1, 1, 0));
}

namespace {
Tensor to_weights(const Tensor& x, const Tensor& w, int64_t channels, const char* what) {
  if (!x.defined() || x.dim() != 4)
    throw UserError("EINPUT", std::string("VAE: ") + what + " must be a [batch, channels, height, width] tensor" +
                                  (x.defined() ? ", got " + std::to_string(x.dim()) + " dimensions" : std::string()));
  if (x.size(1) != channels)
    throw UserError("EINPUT", std::string("VAE: ") + what + " has " + std::to_string(x.size(1)) + " channels, the VAE expects " +
                                  std::to_string(channels));
  if (!x.is_floating_point()) throw UserError("EINPUT", std::string("VAE: ") + what + " must be a floating-point tensor");
  return x.to(w.device(), w.scalar_type());
}
}  // namespace

AutoencoderKL::Posterior AutoencoderKL::encode(const Tensor& image) const {
  Tensor h = encoder->forward(to_weights(image, encoder->conv_in->weight, config.in_channels, "image"));
  if (quant_conv) h = quant_conv->forward(h);
  auto parts = h.chunk(2, 1);
  Posterior p;
  p.mean = parts[0];
  p.logvar = at::clamp(parts[1], -30.0, 20.0);
  p.std = at::exp(0.5 * p.logvar);
  return p;
}

Tensor AutoencoderKL::decode(const Tensor& z0) const {
  Tensor z = to_weights(z0, decoder->conv_in->weight, config.latent_channels, "latents");
  if (post_quant_conv) z = post_quant_conv->forward(z);
  return decoder->forward(z);
}

namespace {
// diffusers' _convert_deprecated_attention_blocks: query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0.
std::string rename_vae_key(const std::string& key) {
  if (key.find(".attentions.") == std::string::npos) return key;
  const auto dot = key.rfind('.');
  if (dot == std::string::npos) return key;
  const std::string stem = key.substr(0, dot), leaf = key.substr(dot);  // leaf: ".weight" / ".bias"
  static const std::pair<std::string, std::string> kOld[] = {
      {".query", ".to_q"}, {".key", ".to_k"}, {".value", ".to_v"}, {".proj_attn", ".to_out.0"}};
  for (const auto& [from, to] : kOld)
    if (stem.size() > from.size() && stem.compare(stem.size() - from.size(), from.size(), from) == 0)
      return stem.substr(0, stem.size() - from.size()) + to + leaf;
  return key;
}
}  // namespace

std::shared_ptr<AutoencoderKL> AutoencoderKL::load_from(const AutoencoderKLConfig& cfg, const WeightSource& src,
                                                        const std::function<std::string(const std::string&)>& rename_key,
                                                        std::optional<torch::ScalarType> dtype, torch::Device device) {
  // The caller's names may still be the old attention names: map those too.
  auto rename = [&rename_key](const std::string& key) -> std::string {
    std::string name = rename_key ? rename_key(key) : key;
    return name.empty() ? name : rename_vae_key(name);
  };
  // force_upcast (the default, and SD 1.5's VAE): the VAE overflows in fp16, so it stays fp32 when the pipeline asks
  // for fp16 (encode/decode convert their inputs to the VAE's dtype; callers get fp32 latents and images).
  if (dtype && *dtype == torch::kFloat16 && cfg.force_upcast) dtype = torch::kFloat32;
  auto m = std::make_shared<AutoencoderKL>(cfg);

  // Old conversions store the attention projections as 1x1 convs [C, C, 1, 1]: give those parameters the
  // file's shape for the load, and the Linear shape [C, C] back afterwards.
  std::map<std::string, Tensor> params;
  for (auto& p : m->named_parameters(true)) params.emplace(p.key(), p.value());
  std::vector<std::pair<Tensor, std::vector<int64_t>>> squeeze_back;
  {
    torch::NoGradGuard ng;
    for (const auto& key : src.keys()) {
      const std::string name = rename(key);
      auto it = params.find(name);
      if (it == params.end() || name.find(".attentions.") == std::string::npos) continue;
      const auto fs = src.shape(key);
      const auto ms = it->second.sizes().vec();
      if (ms.size() == 2 && fs.size() == 4 && fs[0] == ms[0] && fs[1] == ms[1] && fs[2] == 1 && fs[3] == 1) {
        it->second.set_data(torch::empty(fs, it->second.options()));
        squeeze_back.emplace_back(it->second, ms);
      }
    }
  }
  load_module(*m, src, {dtype, device, rename}, "VAE");
  {
    torch::NoGradGuard ng;
    for (auto& [p, shape] : squeeze_back) p.set_data(p.detach().reshape(shape));
  }
  return m;
}

}  // namespace tl
