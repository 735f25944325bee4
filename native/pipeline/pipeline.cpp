#include "pipeline/pipeline.h"

#include <sys/stat.h>

#include "runtime/engine.h"
#include "lora/lora.h"
#include "io/safetensors.h"
#include "io/single_file.h"
#include "io/weights.h"

namespace tl {
namespace {

bool is_dir(const std::string& p) {
  struct stat sb;
  return ::stat(p.c_str(), &sb) == 0 && S_ISDIR(sb.st_mode);
}

// One component through Model::load_from in the pipeline's dtype and device, frozen and in eval mode.
template <class Model>
std::shared_ptr<Model> frozen_component(const typename Model::Config& cfg, const WeightSource& src,
                                        const std::function<std::string(const std::string&)>& rename, const Pipeline& p) {
  auto m = Model::load_from(cfg, src, rename, p.dtype, p.device);
  for (auto& t : m->parameters(true)) t.set_requires_grad(false);
  m->eval();
  return m;
}

// A component folder: config.json + <Model::kWeightsStem>[.<variant>].safetensors (or shards).
template <class Model>
typename Model::Config folder_config(const std::string& dir) {
  const std::string cfg_path = dir + "/config.json";
  return Model::Config::from_json(read_json_file(cfg_path), cfg_path);
}
template <class Model>
std::shared_ptr<Model> folder_component(const std::string& dir, const std::string& variant, const Pipeline& p) {
  return frozen_component<Model>(folder_config<Model>(dir), WeightSource::open_component(dir, Model::kWeightsStem, variant), nullptr, p);
}

const torch::Tensor* find(const NamedTensors& v, const std::string& name) {
  for (const auto& [k, t] : v)
    if (k == name) return &t;
  return nullptr;
}

}  // namespace

std::map<std::string, torch::nn::Module*> lora_models(Pipeline& p) { return {{"unet", p.unet.get()}, {"text_encoder", p.text_encoder.get()}}; }

size_t pipeline_apply_lora(Pipeline& p, const std::string& file, double scale, LoraFormat* format, std::optional<double> alpha_if_unknown) {
  const std::map<std::string, torch::nn::Module*> models = lora_models(p);
  LoraFile lora = read_lora_for(file, models, alpha_if_unknown);
  size_t n = 0;
  for (const auto& [comp, w] : lora.components) {
    torch::nn::Module* m = models.at(comp);
    apply_lora_weights(*m, w, p.device, file);
    for (auto& t : lora_modules(*m)) t.layer->lora_multiplier = scale;
    n += w.modules.size();
  }
  if (format) *format = lora.format;
  return n;
}

namespace {

// A single-file SD 1.x checkpoint (single_file.h): one memory-mapped file, keys mapped to diffusers names while loading.
std::shared_ptr<Pipeline> load_single_file(const std::string& file, const PipelineOptions& opts) {
  if (!opts.variant.empty())
    throw UserError("EINPUT", file + ": --variant selects a file inside a model folder; a single-file checkpoint has none");
  WeightSource src = WeightSource::open_file(file);
  SingleFileModel sf = describe_single_file(src);
  auto p = std::make_shared<Pipeline>();
  p->dir = file;
  p->device = opts.device;
  p->dtype = opts.dtype.value_or(torch::kFloat32);
  auto need = [&](const std::string& c) { return opts.components.count(c) > 0; };
  const std::string where = file + " (inferred ";
  if (need("text_encoder"))
    p->text_encoder = frozen_component<CLIPTextModel>(CLIPTextConfig::from_json(sf.text_encoder, where + "text encoder config)"), src, sf.text_encoder_key, *p);
  if (need("unet")) p->unet = frozen_component<UNet2DConditionModel>(UNet2DConditionConfig::from_json(sf.unet, where + "UNet config)"), src, sf.unet_key, *p);
  if (need("vae")) p->vae = frozen_component<AutoencoderKL>(AutoencoderKLConfig::from_json(sf.vae, where + "VAE config)"), src, sf.vae_key, *p);
  return p;
}

}  // namespace

std::string single_file_configs_json(const std::string& file) {
  WeightSource src = WeightSource::open_file(file);
  SingleFileModel sf = describe_single_file(src);
  return Json(Json::Object{{"unet", sf.unet}, {"vae", sf.vae}, {"text_encoder", sf.text_encoder}}).dump();
}

std::shared_ptr<Pipeline> load_pipeline(const std::string& dir, const PipelineOptions& opts) {
  if (is_single_file_checkpoint(dir)) return load_single_file(dir, opts);
  if (!is_dir(dir))
    throw UserError("ENOENT", dir + ": model folder not found (expected a diffusers folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/)");
  auto p = std::make_shared<Pipeline>();
  p->dir = dir;
  p->device = opts.device;
  // Like diffusers without torch_dtype: weights are converted to fp32 whatever the file holds (e.g. an fp16 variant).
  p->dtype = opts.dtype.value_or(torch::kFloat32);
  auto need = [&](const std::string& c) { return opts.components.count(c) > 0; };
  auto check_dir = [&](const std::string& c) {
    if (!is_dir(dir + "/" + c))
      throw UserError("ENOENT", dir + "/" + c + ": missing; a Stable Diffusion folder in diffusers layout has unet/, vae/, text_encoder/ and tokenizer/");
    return dir + "/" + c;
  };
  if (need("text_encoder")) p->text_encoder = folder_component<CLIPTextModel>(check_dir("text_encoder"), opts.variant, *p);
  if (need("unet")) p->unet = folder_component<UNet2DConditionModel>(check_dir("unet"), opts.variant, *p);
  if (need("vae")) p->vae = folder_component<AutoencoderKL>(check_dir("vae"), opts.variant, *p);
  return p;
}

std::shared_ptr<torch::nn::Module> build_component(const std::string& dir, const std::string& kind) {
  if (kind == "unet") return std::make_shared<UNet2DConditionModel>(folder_config<UNet2DConditionModel>(dir));
  if (kind == "vae") return std::make_shared<AutoencoderKL>(folder_config<AutoencoderKL>(dir));
  if (kind == "text_encoder") return std::make_shared<CLIPTextModel>(folder_config<CLIPTextModel>(dir));
  throw UserError("EINPUT", "unknown model component \"" + kind + "\" (unet, vae, text_encoder)");
}

void write_random_weights(const std::string& dir, const std::string& kind, uint64_t seed) {
  auto m = build_component(dir, kind);
  nn::init_random(*m, seed);
  NamedTensors ts;
  for (const auto& p : m->named_parameters(true)) ts.emplace_back(p.key(), p.value());
  st::save(dir + "/" + (kind == "text_encoder" ? CLIPTextModel::kWeightsStem : UNet2DConditionModel::kWeightsStem) + ".safetensors", ts, {{"format", "pt"}});
}

NamedTensors run_forward(Pipeline& p, const NamedTensors& inputs, const ForwardOptions& opts) {
  NamedTensors out;
  const auto dev = p.device;
  const auto dt = p.dtype.value_or(torch::kFloat32);
  auto in = [&](const std::string& name) -> torch::Tensor {
    const torch::Tensor* t = find(inputs, name);
    if (!t) return {};
    return t->is_floating_point() ? t->to(dev, dt) : t->to(dev);
  };
  auto emit = [&](const std::string& name, const torch::Tensor& t) { out.emplace_back(name, t.detach().to(torch::kCPU, torch::kFloat32)); };

  LoraFormat lora_format = LoraFormat::Peft;
  const bool has_lora = !opts.lora_path.empty();
  if (has_lora) pipeline_apply_lora(p, opts.lora_path, opts.lora_scale, &lora_format, opts.lora_alpha);

  if (torch::Tensor ids = in("input_ids"); ids.defined()) {
    if (!p.text_encoder) throw UserError("EINPUT", "input_ids given but the text encoder is not loaded");
    torch::NoGradGuard ng;
    emit("text_embeddings", p.text_encoder->forward(ids));
  }

  torch::Tensor latents = in("latents"), timesteps = in("timesteps"), ehs = in("encoder_hidden_states");
  if (latents.defined() || timesteps.defined() || ehs.defined()) {
    if (!latents.defined() || !timesteps.defined() || !ehs.defined())
      throw UserError("EINPUT", "the UNet needs latents, timesteps and encoder_hidden_states together");
    if (!p.unet) throw UserError("EINPUT", "UNet inputs given but the UNet is not loaded");
    torch::Tensor target = in("target");
    if (opts.backward) {
      if (!target.defined()) throw UserError("EINPUT", "--backward needs a `target` tensor (shape of latents)");
      if (!has_lora) throw UserError("EINPUT", "--backward computes LoRA gradients: give --lora");
      auto mods = lora_modules(*p.unet);
      for (auto& m : mods) {
        m.layer->lora_A.set_requires_grad(true);
        m.layer->lora_B.set_requires_grad(true);
        m.layer->lora_A.mutable_grad() = torch::Tensor();
        m.layer->lora_B.mutable_grad() = torch::Tensor();
      }
      p.unet->gradient_checkpointing = opts.gradient_checkpointing;
      if (opts.gradient_checkpointing) p.unet->train();
      torch::Tensor pred, loss;
      try {
        pred = p.unet->forward(latents, timesteps, ehs);
        loss = torch::mse_loss(pred.to(torch::kFloat32), target.to(torch::kFloat32));
        loss.backward();
      } catch (...) {
        p.unet->gradient_checkpointing = false;
        p.unet->eval();
        throw;
      }
      p.unet->gradient_checkpointing = false;
      p.unet->eval();
      emit("noise_pred", pred);
      emit("loss", loss);
      for (auto& m : mods) {
        emit("grad." + lora_key("unet", m.path, true, lora_format), m.layer->lora_A.grad());
        emit("grad." + lora_key("unet", m.path, false, lora_format), m.layer->lora_B.grad());
      }
    } else {
      torch::NoGradGuard ng;
      emit("noise_pred", p.unet->forward(latents, timesteps, ehs));
    }
  }

  if (torch::Tensor image = in("image"); image.defined()) {
    if (!p.vae) throw UserError("EINPUT", "image given but the VAE is not loaded");
    torch::NoGradGuard ng;
    auto post = p.vae->encode(image);
    emit("vae_mean", post.mean);
    emit("vae_std", post.std);
  }
  if (torch::Tensor z = in("vae_latents"); z.defined()) {
    if (!p.vae) throw UserError("EINPUT", "vae_latents given but the VAE is not loaded");
    torch::NoGradGuard ng;
    emit("vae_decoded", p.vae->decode(z));
  }
  return out;
}

}  // namespace tl
