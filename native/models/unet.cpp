#include "models/unet.h"

#include <cmath>

#include "models/config.h"
#include "io/weights.h"

namespace tl {

// ---------------- config ----------------

UNet2DConditionConfig UNet2DConditionConfig::from_json(const Json& j, const std::string& path) {
  ConfigReader r(j, path);
  UNet2DConditionConfig c;
  c.in_channels = r.integer("in_channels", 4, 1);
  c.out_channels = r.integer("out_channels", 4, 1);
  c.sample_size = r.integer("sample_size", 64, 1);
  c.center_input_sample = r.boolean("center_input_sample", false);
  c.flip_sin_to_cos = r.boolean("flip_sin_to_cos", true);
  c.freq_shift = r.number("freq_shift", 0);
  c.down_block_types = r.choices("down_block_types", {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"},
                                 {"CrossAttnDownBlock2D", "DownBlock2D"});
  c.up_block_types = r.choices("up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"},
                               {"CrossAttnUpBlock2D", "UpBlock2D"});
  const size_t n = c.down_block_types.size();
  if (n == 0) r.fail("down_block_types", "must not be empty");
  if (c.up_block_types.size() != n)
    r.fail("up_block_types", "must have as many entries as down_block_types (" + std::to_string(n) + ")");
  c.block_out_channels = r.ints("block_out_channels", {320, 640, 1280, 1280}, 0, 1);
  if (c.block_out_channels.size() != n)
    r.fail("block_out_channels", "must have one entry per down block (" + std::to_string(n) + ")");
  c.layers_per_block = r.ints("layers_per_block", {2}, n, 1);
  c.transformer_layers_per_block = r.ints("transformer_layers_per_block", {1}, n, 1);
  c.downsample_padding = r.integer("downsample_padding", 1, 0);
  c.mid_block_scale_factor = r.number("mid_block_scale_factor", 1);
  if (!r.present("norm_num_groups")) {
    if (r.raw("norm_num_groups").is_null() && j.has("norm_num_groups"))
      r.fail("norm_num_groups", "null (no group norm) is not supported");
  }
  c.norm_num_groups = r.integer("norm_num_groups", 32, 1);
  c.norm_eps = r.positive("norm_eps", 1e-5);
  c.cross_attention_dim = r.ints("cross_attention_dim", {1280}, n, 1);
  // diffusers' naming quirk: attention_head_dim is the NUMBER of heads when num_attention_heads is null.
  if (r.present("num_attention_heads")) c.num_attention_heads = r.ints("num_attention_heads", {8}, n, 1);
  else c.num_attention_heads = r.ints("attention_head_dim", {8}, n, 1);
  c.only_cross_attention = r.bools("only_cross_attention", false, n);
  c.use_linear_projection = r.boolean("use_linear_projection", false);
  c.upcast_attention = r.boolean("upcast_attention", false);
  c.conv_in_kernel = r.integer("conv_in_kernel", 3, 1);
  c.conv_out_kernel = r.integer("conv_out_kernel", 3, 1);
  if (c.conv_in_kernel % 2 == 0) r.fail("conv_in_kernel", "must be odd");
  if (c.conv_out_kernel % 2 == 0) r.fail("conv_out_kernel", "must be odd");
  c.resnet_out_scale_factor = r.number("resnet_out_scale_factor", 1.0);
  r.choice("mid_block_type", "UNetMidBlock2DCrossAttn", {"UNetMidBlock2DCrossAttn"});  // or null: no mid block
  // An explicit null means no mid block (diffusers builds none); a missing key means the default block.
  c.has_mid_block = !(j.has("mid_block_type") && j["mid_block_type"].is_null());
  // Features of other model families (SDXL, class-conditioned, LCM, ...) that this UNet does not implement.
  r.require_value("act_fn", Json("silu"));
  r.require_value("resnet_time_scale_shift", Json("default"));
  r.require_value("time_embedding_type", Json("positional"));
  r.require_value("attention_type", Json("default"));
  r.require_value("dual_cross_attention", Json(false));
  r.require_value("resnet_skip_time_act", Json(false));
  r.require_value("class_embeddings_concat", Json(false));
  for (const char* k : {"class_embed_type", "num_class_embeds", "addition_embed_type", "addition_time_embed_dim",
                        "encoder_hid_dim", "encoder_hid_dim_type", "time_cond_proj_dim", "time_embedding_act_fn",
                        "timestep_post_act", "time_embedding_dim", "projection_class_embeddings_input_dim",
                        "cross_attention_norm", "reverse_transformer_layers_per_block"})
    r.require_null(k, "an SD 1.x/2.x UNet has none");
  // Sizes that divide others are at least 1 (read above): a 0 here used to reach an integer division (SIGFPE).
  for (size_t i = 0; i < n; ++i) {
    if (c.block_out_channels[i] % c.norm_num_groups != 0)
      r.fail("block_out_channels", std::to_string(c.block_out_channels[i]) + " is not divisible by norm_num_groups " + std::to_string(c.norm_num_groups));
    if (c.block_out_channels[i] % c.num_attention_heads[i] != 0)
      r.fail("attention_head_dim", std::to_string(c.block_out_channels[i]) + " channels are not divisible by " + std::to_string(c.num_attention_heads[i]) + " heads");
  }
  return c;
}

// ---------------- blocks ----------------

BasicTransformerBlock::BasicTransformerBlock(int64_t dim, int64_t heads, int64_t head_dim, int64_t cross_dim, bool only_cross)
    : only_cross_attention(only_cross) {
  norm1 = register_module("norm1", std::make_shared<nn::LayerNorm>(dim, 1e-5));
  attn1 = register_module("attn1", std::make_shared<nn::Attention>(dim, only_cross ? cross_dim : 0, heads, head_dim, false, true));
  norm2 = register_module("norm2", std::make_shared<nn::LayerNorm>(dim, 1e-5));
  attn2 = register_module("attn2", std::make_shared<nn::Attention>(dim, cross_dim, heads, head_dim, false, true));
  norm3 = register_module("norm3", std::make_shared<nn::LayerNorm>(dim, 1e-5));
  // FeedForward(dim, activation_fn="geglu"): net.0 = GEGLU(proj: dim -> 2*4*dim), net.1 = Dropout, net.2 = Linear.
  const int64_t inner = dim * 4;
  auto ff = register_module("ff", std::make_shared<torch::nn::Module>());
  auto net = torch::nn::ModuleList();
  auto geglu = std::make_shared<torch::nn::Module>();
  ff_proj = geglu->register_module("proj", std::make_shared<nn::Linear>(dim, inner * 2));
  ff_out = std::make_shared<nn::Linear>(inner, dim);
  net->push_back(geglu);
  net->push_back(torch::nn::Dropout(0.0));
  net->push_back(ff_out);
  ff->register_module("net", net);
}

torch::Tensor BasicTransformerBlock::forward(const torch::Tensor& x, const torch::Tensor& context) const {
  torch::Tensor h = attn1->forward(norm1->forward(x), only_cross_attention ? context : torch::Tensor()) + x;
  h = attn2->forward(norm2->forward(h), context) + h;
  auto parts = ff_proj->forward(norm3->forward(h)).chunk(2, -1);
  return ff_out->forward(parts[0] * at::gelu(parts[1])) + h;
}

Transformer2DModel::Transformer2DModel(int64_t channels, int64_t heads, int64_t layers, int64_t cross_dim, int64_t groups,
                                       bool linear, bool only_cross)
    : use_linear_projection(linear) {
  const int64_t head_dim = channels / heads, inner = heads * head_dim;
  norm = register_module("norm", std::make_shared<nn::GroupNorm>(groups, channels, 1e-6));
  if (linear) proj_in_linear = register_module("proj_in", std::make_shared<nn::Linear>(channels, inner));
  else proj_in_conv = register_module("proj_in", std::make_shared<nn::Conv2d>(channels, inner, 1));
  for (int64_t i = 0; i < layers; ++i)
    transformer_blocks.push(std::make_shared<BasicTransformerBlock>(inner, heads, head_dim, cross_dim, only_cross));
  register_module("transformer_blocks", transformer_blocks.holder);
  if (linear) proj_out_linear = register_module("proj_out", std::make_shared<nn::Linear>(inner, channels));
  else proj_out_conv = register_module("proj_out", std::make_shared<nn::Conv2d>(inner, channels, 1));
}

torch::Tensor Transformer2DModel::forward(const torch::Tensor& x, const torch::Tensor& context, bool checkpointing) const {
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  torch::Tensor h = norm->forward(x);
  int64_t inner;
  if (use_linear_projection) {
    inner = h.size(1);
    h = h.permute({0, 2, 3, 1}).reshape({B, H * W, inner});
    h = proj_in_linear->forward(h);
  } else {
    h = proj_in_conv->forward(h);
    inner = h.size(1);
    h = h.permute({0, 2, 3, 1}).reshape({B, H * W, inner});
  }
  for (const auto& block : transformer_blocks) {
    if (checkpointing) {
      auto* b = block.get();
      h = nn::checkpoint([b](const std::vector<torch::Tensor>& in) { return std::vector<torch::Tensor>{b->forward(in[0], in[1])}; },
                         {h, context})[0];
    } else {
      h = block->forward(h, context);
    }
  }
  if (use_linear_projection) {
    h = proj_out_linear->forward(h);
    h = h.reshape({B, H, W, -1}).permute({0, 3, 1, 2}).contiguous();
  } else {
    h = h.reshape({B, H, W, inner}).permute({0, 3, 1, 2}).contiguous();
    h = proj_out_conv->forward(h);
  }
  return h + x;
}

torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double freq_shift) {
  const int64_t half = dim / 2;
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(timesteps.device());
  torch::Tensor exponent = -std::log(10000.0) * torch::arange(0, half, opts);
  exponent = exponent / (static_cast<double>(half) - freq_shift);
  torch::Tensor emb = timesteps.unsqueeze(1).to(torch::kFloat32) * torch::exp(exponent).unsqueeze(0);
  emb = torch::cat({torch::sin(emb), torch::cos(emb)}, -1);
  if (flip_sin_to_cos) emb = torch::cat({emb.slice(1, half), emb.slice(1, 0, half)}, -1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1, 0, 0}, 0);
  return emb;
}

// ---------------- model ----------------

UNet2DConditionModel::UNet2DConditionModel(const UNet2DConditionConfig& cfg) : config(cfg) {
  const auto& boc = cfg.block_out_channels;
  const size_t n = boc.size();
  const int64_t G = cfg.norm_num_groups;
  const double eps = cfg.norm_eps;
  const int64_t temb_dim = boc[0] * 4;
  conv_in = register_module("conv_in", std::make_shared<nn::Conv2d>(cfg.in_channels, boc[0], cfg.conv_in_kernel, 1, (cfg.conv_in_kernel - 1) / 2));
  auto time_embedding = register_module("time_embedding", std::make_shared<torch::nn::Module>());
  time_linear_1 = time_embedding->register_module("linear_1", std::make_shared<nn::Linear>(boc[0], temb_dim));
  time_linear_2 = time_embedding->register_module("linear_2", std::make_shared<nn::Linear>(temb_dim, temb_dim));

  int64_t out_ch = boc[0];
  for (size_t i = 0; i < n; ++i) {
    const int64_t in_ch = out_ch;
    out_ch = boc[i];
    const bool is_final = i + 1 == n;
    const bool cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
    auto block = std::make_shared<UNetBlock>();
    for (int64_t l = 0; l < cfg.layers_per_block[i]; ++l) {
      block->resnets.push(std::make_shared<ResnetBlock2D>(l == 0 ? in_ch : out_ch, out_ch, temb_dim, G, eps, Activation::SiLU, cfg.resnet_out_scale_factor));
      if (cross)
        block->attentions.push(std::make_shared<Transformer2DModel>(out_ch, cfg.num_attention_heads[i], cfg.transformer_layers_per_block[i],
                                                                    cfg.cross_attention_dim[i], G, cfg.use_linear_projection,
                                                                    cfg.only_cross_attention[i]));
    }
    block->register_module("resnets", block->resnets.holder);
    if (cross) block->register_module("attentions", block->attentions.holder);
    if (!is_final) {
      block->samplers.push(std::make_shared<Sampler2D>(out_ch, true, cfg.downsample_padding));
      block->register_module("downsamplers", block->samplers.holder);
    }
    down_blocks.push(block);
  }
  register_module("down_blocks", down_blocks.holder);

  if (cfg.has_mid_block) {
    mid_block = std::make_shared<UNetBlock>();
    const int64_t ch = boc.back();
    mid_block->resnets.push(std::make_shared<ResnetBlock2D>(ch, ch, temb_dim, G, eps, Activation::SiLU, cfg.mid_block_scale_factor));
    mid_block->attentions.push(std::make_shared<Transformer2DModel>(ch, cfg.num_attention_heads.back(), cfg.transformer_layers_per_block.back(),
                                                                    cfg.cross_attention_dim.back(), G, cfg.use_linear_projection, false));
    mid_block->resnets.push(std::make_shared<ResnetBlock2D>(ch, ch, temb_dim, G, eps, Activation::SiLU, cfg.mid_block_scale_factor));
    mid_block->register_module("attentions", mid_block->attentions.holder);
    mid_block->register_module("resnets", mid_block->resnets.holder);
    register_module("mid_block", mid_block);
  }

  std::vector<int64_t> rboc(boc.rbegin(), boc.rend());
  std::vector<int64_t> rheads(cfg.num_attention_heads.rbegin(), cfg.num_attention_heads.rend());
  std::vector<int64_t> rlayers(cfg.layers_per_block.rbegin(), cfg.layers_per_block.rend());
  std::vector<int64_t> rcross(cfg.cross_attention_dim.rbegin(), cfg.cross_attention_dim.rend());
  std::vector<int64_t> rtlayers(cfg.transformer_layers_per_block.rbegin(), cfg.transformer_layers_per_block.rend());
  std::vector<bool> ronly(cfg.only_cross_attention.rbegin(), cfg.only_cross_attention.rend());
  out_ch = rboc[0];
  for (size_t i = 0; i < n; ++i) {
    const bool is_final = i + 1 == n;
    const int64_t prev_out = out_ch;
    out_ch = rboc[i];
    const int64_t in_ch = rboc[std::min(i + 1, n - 1)];
    const bool cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
    auto block = std::make_shared<UNetBlock>();
    const int64_t num_layers = rlayers[i] + 1;
    for (int64_t l = 0; l < num_layers; ++l) {
      const int64_t skip = l == num_layers - 1 ? in_ch : out_ch;
      const int64_t res_in = l == 0 ? prev_out : out_ch;
      block->resnets.push(std::make_shared<ResnetBlock2D>(res_in + skip, out_ch, temb_dim, G, eps, Activation::SiLU, cfg.resnet_out_scale_factor));
      if (cross)
        block->attentions.push(std::make_shared<Transformer2DModel>(out_ch, rheads[i], rtlayers[i], rcross[i], G, cfg.use_linear_projection, ronly[i]));
    }
    block->register_module("resnets", block->resnets.holder);
    if (cross) block->register_module("attentions", block->attentions.holder);
    if (!is_final) {
      block->samplers.push(std::make_shared<Sampler2D>(out_ch, false, 1));
      block->register_module("upsamplers", block->samplers.holder);
    }
    up_blocks.push(block);
  }
  register_module("up_blocks", up_blocks.holder);

  conv_norm_out = register_module("conv_norm_out", std::make_shared<nn::GroupNorm>(G, boc[0], eps));
  conv_out = register_module("conv_out", std::make_shared<nn::Conv2d>(boc[0], cfg.out_channels, cfg.conv_out_kernel, 1, (cfg.conv_out_kernel - 1) / 2));
  // upcast_attention (SD 2.1): attention scores and softmax in fp32 when the attention runs in fp16/bf16.
  if (cfg.upcast_attention)
    for (const auto& m : modules(false))
      if (auto* a = dynamic_cast<nn::Attention*>(m.get())) a->upcast = true;
}

namespace {
torch::Tensor run_resnet(const ResnetBlock2D& r, const torch::Tensor& h, const torch::Tensor& temb, bool ckpt) {
  if (!ckpt) return r.forward(h, temb);
  const ResnetBlock2D* p = &r;
  return nn::checkpoint([p](const std::vector<torch::Tensor>& in) { return std::vector<torch::Tensor>{p->forward(in[0], in[1])}; },
                        {h, temb})[0];
}
}  // namespace

torch::Tensor UNet2DConditionModel::forward(const torch::Tensor& sample_in, const torch::Tensor& timesteps_in,
                                            const torch::Tensor& ehs) const {
  const bool ckpt = gradient_checkpointing && is_training() && torch::GradMode::is_enabled();
  const int64_t B = sample_in.size(0);
  const int64_t up_factor = int64_t(1) << (config.block_out_channels.size() - 1);
  bool forward_upsample_size = sample_in.size(2) % up_factor != 0 || sample_in.size(3) % up_factor != 0;

  torch::Tensor sample = config.center_input_sample ? 2 * sample_in - 1.0 : sample_in;
  torch::Tensor timesteps = timesteps_in.to(sample.device());
  if (timesteps.dim() == 0) timesteps = timesteps.unsqueeze(0);
  timesteps = timesteps.expand({B});
  torch::Tensor t_emb = timestep_embedding(timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
                            .to(sample.scalar_type());
  torch::Tensor emb = time_linear_2->forward(at::silu(time_linear_1->forward(t_emb)));

  torch::Tensor h = conv_in->forward(sample);
  std::vector<torch::Tensor> res{h};
  for (const auto& block : down_blocks) {
    for (size_t l = 0; l < block->resnets.size(); ++l) {
      h = run_resnet(block->resnets[l], h, emb, ckpt);
      if (!block->attentions.empty()) h = block->attentions[l].forward(h, ehs, ckpt);
      res.push_back(h);
    }
    if (!block->samplers.empty()) {
      h = block->samplers[0].forward(h);
      res.push_back(h);
    }
  }
  if (mid_block) {
    h = run_resnet(mid_block->resnets[0], h, emb, ckpt);
    h = mid_block->attentions[0].forward(h, ehs, ckpt);
    h = run_resnet(mid_block->resnets[1], h, emb, ckpt);
  }
  for (size_t i = 0; i < up_blocks.size(); ++i) {
    const auto& block = up_blocks.items[i];
    for (size_t l = 0; l < block->resnets.size(); ++l) {
      torch::Tensor skip = res.back();
      res.pop_back();
      h = torch::cat({h, skip}, 1);
      h = run_resnet(block->resnets[l], h, emb, ckpt);
      if (!block->attentions.empty()) h = block->attentions[l].forward(h, ehs, ckpt);
    }
    if (!block->samplers.empty()) {
      std::optional<std::vector<int64_t>> size;
      if (forward_upsample_size) size = std::vector<int64_t>{res.back().size(2), res.back().size(3)};
      h = block->samplers[0].forward(h, size);
    }
  }
  h = conv_out->forward(at::silu(conv_norm_out->forward(h)));
  return h;
}

std::shared_ptr<UNet2DConditionModel> UNet2DConditionModel::load_from(const UNet2DConditionConfig& cfg, const WeightSource& src,
                                                                      const std::function<std::string(const std::string&)>& rename,
                                                                      std::optional<torch::ScalarType> dtype, torch::Device device) {
  auto model = std::make_shared<UNet2DConditionModel>(cfg);
  load_module(*model, src, {dtype, device, rename}, "UNet2DConditionModel");
  return model;
}

}  // namespace tl
