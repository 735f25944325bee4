#include "io/single_file.h"

#include <sys/stat.h>

#include <cctype>
#include <cstring>
#include <map>
#include <regex>
#include <set>

#include "runtime/engine.h"

namespace tl {
namespace {

const std::string kUnet = "model.diffusion_model.";
const std::string kVae = "first_stage_model.";
const std::string kClip = "cond_stage_model.transformer.";

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// The distinct integers N of keys "<prefix>N." (e.g. input_blocks.N.).
std::set<int64_t> indices(const WeightSource& src, const std::string& prefix) {
  std::set<int64_t> out;
  for (const auto& k : src.keys()) {
    if (!starts_with(k, prefix)) continue;
    size_t i = prefix.size(), j = i;
    while (j < k.size() && std::isdigit(static_cast<unsigned char>(k[j]))) ++j;
    if (j > i && j < k.size() && k[j] == '.') out.insert(std::stoll(k.substr(i, j - i)));
  }
  return out;
}

[[noreturn]] void refuse(const WeightSource& src, const std::string& what) { throw UserError("EMODELFILE", src.describe() + ": " + what); }

std::vector<int64_t> shape_of(const WeightSource& src, const std::string& key) {
  if (!src.has(key)) refuse(src, "has no tensor \"" + key + "\" (not a complete SD 1.x checkpoint in the original layout)");
  return src.shape(key);
}

// The resnet part of an LDM UNet key -> diffusers (update_unet_resnet_ldm_to_diffusers).
std::string unet_resnet(const std::string& rest) {
  static const std::pair<const char*, const char*> kMap[] = {{"in_layers.0.", "norm1."},     {"in_layers.2.", "conv1."},
                                                           {"out_layers.0.", "norm2."},    {"out_layers.3.", "conv2."},
                                                           {"emb_layers.1.", "time_emb_proj."}, {"skip_connection.", "conv_shortcut."}};
  for (const auto& [from, to] : kMap)
    if (starts_with(rest, from)) return to + rest.substr(std::strlen(from));
  return rest;
}

// convert_ldm_unet_checkpoint's mapping for one key (without the model.diffusion_model. prefix); L = layers_per_block.
std::string unet_key(const std::string& k, int64_t L) {
  static const std::regex block(R"(^(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.*)$)");
  static const std::pair<const char*, const char*> kFixed[] = {{"time_embed.0.", "time_embedding.linear_1."},
                                                             {"time_embed.2.", "time_embedding.linear_2."},
                                                             {"out.0.", "conv_norm_out."},
                                                             {"out.2.", "conv_out."}};
  for (const auto& [from, to] : kFixed)
    if (starts_with(k, from)) return to + k.substr(std::strlen(from));
  std::smatch m;
  if (!std::regex_match(k, m, block)) return kUnet + k;  // unknown: left as it is, so the loader lists it
  const std::string part = m[1];
  const int64_t i = std::stoll(m[2]);
  if (part == "middle_block") {
    // middle_block.{0,1,2}.rest (no sub index)
    const std::string rest = m[3].matched ? std::string(m[3]) + "." + std::string(m[4]) : std::string(m[4]);
    if (i == 0) return "mid_block.resnets.0." + unet_resnet(rest);
    if (i == 1) return "mid_block.attentions.0." + rest;
    if (i == 2) return "mid_block.resnets.1." + unet_resnet(rest);
    return kUnet + k;
  }
  if (!m[3].matched) return kUnet + k;
  const int64_t j = std::stoll(m[3]);
  const std::string rest = m[4];
  if (part == "input_blocks") {
    if (i == 0) return j == 0 ? "conv_in." + rest : kUnet + k;
    const int64_t b = (i - 1) / (L + 1), l = (i - 1) % (L + 1);
    const std::string down = "down_blocks." + std::to_string(b) + ".";
    if (j == 0 && starts_with(rest, "op.")) return down + "downsamplers.0.conv." + rest.substr(3);
    if (j == 0) return down + "resnets." + std::to_string(l) + "." + unet_resnet(rest);
    if (j == 1) return down + "attentions." + std::to_string(l) + "." + rest;
    return kUnet + k;
  }
  const int64_t b = i / (L + 1), l = i % (L + 1);
  const std::string up = "up_blocks." + std::to_string(b) + ".";
  if (j == 0) return up + "resnets." + std::to_string(l) + "." + unet_resnet(rest);
  if ((j == 1 || j == 2) && starts_with(rest, "conv.")) return up + "upsamplers.0.conv." + rest.substr(5);
  if (j == 1) return up + "attentions." + std::to_string(l) + "." + rest;
  return kUnet + k;
}

// convert_ldm_vae_checkpoint's mapping for one key (without first_stage_model.); n = the decoder's number of levels.
std::string vae_key(const std::string& k, int64_t n) {
  static const std::regex down(R"(^encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.*)$)");
  static const std::regex up(R"(^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)$)");
  static const std::regex mid(R"(^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)$)");
  static const std::regex norm_out(R"(^(encoder|decoder)\.norm_out\.(.*)$)");
  auto shortcut = [](std::string rest) { return starts_with(rest, "nin_shortcut.") ? "conv_shortcut." + rest.substr(13) : rest; };
  std::smatch m;
  if (std::regex_match(k, m, down)) {
    const std::string pre = "encoder.down_blocks." + std::string(m[1]) + ".";
    if (m[3].matched) return pre + "resnets." + std::string(m[3]) + "." + shortcut(m[4]);
    return pre + "downsamplers.0." + std::string(m[4]);
  }
  if (std::regex_match(k, m, up)) {
    const int64_t b = n - 1 - std::stoll(m[1]);
    if (b < 0) return kVae + k;
    const std::string pre = "decoder.up_blocks." + std::to_string(b) + ".";
    if (m[3].matched) return pre + "resnets." + std::string(m[3]) + "." + shortcut(m[4]);
    return pre + "upsamplers.0." + std::string(m[4]);
  }
  if (std::regex_match(k, m, mid)) {
    const std::string pre = std::string(m[1]) + ".mid_block.";
    const std::string what = m[2], rest = m[3];
    if (what == "block_1") return pre + "resnets.0." + shortcut(rest);
    if (what == "block_2") return pre + "resnets.1." + shortcut(rest);
    static const std::pair<const char*, const char*> kAttn[] = {
        {"norm.", "group_norm."}, {"q.", "to_q."}, {"k.", "to_k."}, {"v.", "to_v."}, {"proj_out.", "to_out.0."}};
    for (const auto& [from, to] : kAttn)
      if (starts_with(rest, from)) return pre + "attentions.0." + to + rest.substr(std::strlen(from));
    return kVae + k;
  }
  if (std::regex_match(k, m, norm_out)) return std::string(m[1]) + ".conv_norm_out." + std::string(m[2]);
  return k;  // conv_in, conv_out, quant_conv, post_quant_conv keep their names
}

Json ints(const std::vector<int64_t>& v) {
  Json::Array a;
  for (auto x : v) a.emplace_back(x);
  return Json(a);
}
Json strings(const std::vector<std::string>& v) {
  Json::Array a;
  for (const auto& x : v) a.emplace_back(x);
  return Json(a);
}

void refuse_other_families(const WeightSource& src) {
  bool sdxl = false, sd3 = false, flux = false, openclip = false, label = false, unet = false, vae = false, clip = false;
  for (const auto& k : src.keys()) {
    sdxl = sdxl || starts_with(k, "conditioner.embedders.");
    label = label || starts_with(k, kUnet + "label_emb.");
    sd3 = sd3 || starts_with(k, kUnet + "joint_blocks.") || starts_with(k, "joint_blocks.");
    flux = flux || starts_with(k, kUnet + "double_blocks.") || starts_with(k, "double_blocks.") || starts_with(k, "single_blocks.");
    openclip = openclip || starts_with(k, "cond_stage_model.model.");
    unet = unet || starts_with(k, kUnet + "input_blocks.");
    vae = vae || starts_with(k, kVae) || starts_with(k, "vae.");
    clip = clip || starts_with(k, kClip);
  }
  if (sdxl || label)
    refuse(src, "an SDXL checkpoint (conditioner.embedders / label_emb keys); train-lora trains Stable Diffusion 1.x/2.x only");
  if (sd3) refuse(src, "a Stable Diffusion 3 checkpoint (joint_blocks keys); train-lora trains Stable Diffusion 1.x/2.x only");
  if (flux) refuse(src, "a Flux checkpoint (double_blocks / single_blocks keys); train-lora trains Stable Diffusion 1.x/2.x only");
  if (openclip)
    refuse(src, "an SD 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.*), which train-lora does not read as a single "
                "file yet: convert it to a diffusers folder once, e.g. in Python: "
                "StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR), and pass DIR");
  if (!unet || !vae || !clip) {
    std::string missing;
    if (!unet) missing += " UNet (model.diffusion_model.*)";
    if (!vae) missing += " VAE (first_stage_model.*)";
    if (!clip) missing += " text encoder (cond_stage_model.transformer.*)";
    refuse(src, "not a complete Stable Diffusion 1.x checkpoint in the original layout: no" + missing +
                    ". A single file must hold all three; a diffusers folder is passed as the folder");
  }
  if (src.has("first_stage_model.encoder.conv_in.weight") == false)
    refuse(src, "its VAE keys are not the original layout (expected first_stage_model.encoder.conv_in.weight)");
}

}  // namespace

bool is_single_file_checkpoint(const std::string& path) {
  struct stat sb;
  return ::stat(path.c_str(), &sb) == 0 && S_ISREG(sb.st_mode);
}

namespace {

// The UNet's config from its input_blocks (levels: resnets, attentions, downsamplers) and its key mapping.
void describe_unet(const WeightSource& src, SingleFileModel& out) {
  std::vector<int64_t> level_channels, level_transformers;
  std::vector<bool> level_attn;
  std::vector<int64_t> level_resnets;
  int64_t cross_dim = -1;
  bool linear_proj = false;
  {
    std::vector<int64_t> ch;
    int64_t resnets = 0, transformers = 1;
    bool attn = false;
    for (int64_t i : indices(src, kUnet + "input_blocks.")) {
      if (i == 0) continue;
      const std::string b = kUnet + "input_blocks." + std::to_string(i) + ".";
      if (src.has(b + "0.op.weight")) {
        level_channels.push_back(ch.empty() ? -1 : ch.front());
        level_attn.push_back(attn);
        level_resnets.push_back(resnets);
        level_transformers.push_back(transformers);
        ch.clear(), resnets = 0, attn = false, transformers = 1;
        continue;
      }
      ch.push_back(shape_of(src, b + "0.out_layers.3.weight")[0]);
      ++resnets;
      if (src.has(b + "1.proj_in.weight")) {
        attn = true;
        transformers = static_cast<int64_t>(indices(src, b + "1.transformer_blocks.").size());
        linear_proj = src.shape(b + "1.proj_in.weight").size() == 2;
        if (cross_dim < 0) cross_dim = shape_of(src, b + "1.transformer_blocks.0.attn2.to_k.weight")[1];
      }
    }
    if (resnets) {
      level_channels.push_back(ch.front());
      level_attn.push_back(attn);
      level_resnets.push_back(resnets);
      level_transformers.push_back(transformers);
    }
  }
  if (level_channels.empty() || level_resnets.front() < 1) refuse(src, "its UNet has no input blocks");
  const int64_t L = level_resnets.front();
  for (auto r : level_resnets)
    if (r != L) refuse(src, "its UNet levels have different numbers of resnets, which an SD 1.x UNet does not");
  if (cross_dim < 0) refuse(src, "its UNet has no cross-attention (not a text-to-image Stable Diffusion UNet)");
  const bool sd2_context = cross_dim == 1024;
  {
    Json::Object u;
    u["_class_name"] = Json("UNet2DConditionModel");
    const auto conv_in = shape_of(src, kUnet + "input_blocks.0.0.weight");
    u["in_channels"] = Json(conv_in[1]);
    u["out_channels"] = Json(shape_of(src, kUnet + "out.2.weight")[0]);
    u["block_out_channels"] = ints(level_channels);
    std::vector<std::string> down, up;
    for (bool a : level_attn) down.push_back(a ? "CrossAttnDownBlock2D" : "DownBlock2D");
    for (auto it = level_attn.rbegin(); it != level_attn.rend(); ++it) up.push_back(*it ? "CrossAttnUpBlock2D" : "UpBlock2D");
    u["down_block_types"] = strings(down);
    u["up_block_types"] = strings(up);
    u["layers_per_block"] = Json(L);
    u["transformer_layers_per_block"] = ints(level_transformers);
    u["cross_attention_dim"] = Json(cross_dim);
    u["use_linear_projection"] = Json(linear_proj);
    // SD 1.x: 8 heads everywhere (the original config's num_heads); SD 2.x: 64-channel heads (num_head_channels).
    if (sd2_context) {
      std::vector<int64_t> heads;
      for (auto c : level_channels) heads.push_back(c / 64);
      u["attention_head_dim"] = ints(heads);
    } else {
      u["attention_head_dim"] = Json(8);
    }
    u["sample_size"] = Json(64);  // 512 px / the VAE's 8
    if (!src.has(kUnet + "middle_block.1.proj_in.weight")) u["mid_block_type"] = Json(nullptr);
    out.unet = Json(u);
  }
  out.unet_key = [L](const std::string& k) -> std::string { return starts_with(k, kUnet) ? unet_key(k.substr(kUnet.size()), L) : ""; };
}

// The VAE's config from its encoder and decoder levels, and its key mapping.
void describe_vae(const WeightSource& src, SingleFileModel& out) {
  const auto down_levels = indices(src, kVae + "encoder.down.");
  const auto up_levels = indices(src, kVae + "decoder.up.");
  if (down_levels.empty() || down_levels.size() != up_levels.size()) refuse(src, "its VAE encoder and decoder have different numbers of levels");
  std::vector<int64_t> ch;
  for (int64_t i : down_levels) ch.push_back(shape_of(src, kVae + "encoder.down." + std::to_string(i) + ".block.0.conv2.weight")[0]);
  const int64_t n = static_cast<int64_t>(up_levels.size());
  Json::Object v;
  v["_class_name"] = Json("AutoencoderKL");
  v["in_channels"] = Json(shape_of(src, kVae + "encoder.conv_in.weight")[1]);
  v["out_channels"] = Json(shape_of(src, kVae + "decoder.conv_out.weight")[0]);
  v["latent_channels"] = Json(shape_of(src, kVae + "decoder.conv_in.weight")[1]);
  v["block_out_channels"] = ints(ch);
  v["down_block_types"] = strings(std::vector<std::string>(ch.size(), "DownEncoderBlock2D"));
  v["up_block_types"] = strings(std::vector<std::string>(ch.size(), "UpDecoderBlock2D"));
  v["layers_per_block"] = Json(static_cast<int64_t>(indices(src, kVae + "encoder.down.0.block.").size()));
  v["norm_num_groups"] = Json(32);
  v["act_fn"] = Json("silu");
  v["sample_size"] = Json(512);
  v["scaling_factor"] = Json(0.18215);
  v["force_upcast"] = Json(true);
  v["use_quant_conv"] = Json(src.has(kVae + "quant_conv.weight"));
  v["use_post_quant_conv"] = Json(src.has(kVae + "post_quant_conv.weight"));
  out.vae = Json(v);
  out.vae_key = [n](const std::string& k) -> std::string { return starts_with(k, kVae) ? vae_key(k.substr(kVae.size()), n) : ""; };
}

// The CLIP text encoder's config (transformers' names under cond_stage_model.transformer.) and its key mapping.
void describe_text_encoder(const WeightSource& src, SingleFileModel& out) {
  std::string tm = kClip + "text_model.";
  if (!src.has(tm + "embeddings.token_embedding.weight")) tm = kClip;
  const auto tok = shape_of(src, tm + "embeddings.token_embedding.weight");
  const auto pos = shape_of(src, tm + "embeddings.position_embedding.weight");
  const int64_t hidden = tok[1];
  Json::Object t;
  t["model_type"] = Json("clip_text_model");
  t["vocab_size"] = Json(tok[0]);
  t["hidden_size"] = Json(hidden);
  t["max_position_embeddings"] = Json(pos[0]);
  t["num_hidden_layers"] = Json(static_cast<int64_t>(indices(src, tm + "encoder.layers.").size()));
  t["intermediate_size"] = Json(shape_of(src, tm + "encoder.layers.0.mlp.fc1.weight")[0]);
  // CLIP's text encoders have 64-channel heads (ViT-L/14: 768 / 12); narrower test models use 8-channel heads.
  t["num_attention_heads"] = Json(hidden % 64 == 0 ? hidden / 64 : (hidden % 8 == 0 ? hidden / 8 : 1));
  t["hidden_act"] = Json("quick_gelu");
  t["layer_norm_eps"] = Json(1e-5);
  out.text_encoder = Json(t);
  out.text_encoder_key = [](const std::string& k) -> std::string { return starts_with(k, kClip) ? k.substr(kClip.size()) : ""; };
}

}  // namespace

SingleFileModel describe_single_file(const WeightSource& src) {
  refuse_other_families(src);
  SingleFileModel out;
  describe_unet(src, out);
  describe_vae(src, out);
  describe_text_encoder(src, out);
  return out;
}

}  // namespace tl
