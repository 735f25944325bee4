// Single-file Stable Diffusion 1.x checkpoints in the original (LDM / CompVis) layout, loaded without conversion on
// disk: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (CLIP text
// encoder). The keys are mapped to diffusers names while loading, as diffusers' single_file_utils does
// (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint), and each component's
// config is inferred from the tensors (SD 1.5's values for what the shapes cannot tell).
#pragma once
#include <functional>
#include <string>

#include "io/json.h"
#include "io/weights.h"

namespace tl {

using KeyMap = std::function<std::string(const std::string&)>;

struct SingleFileModel {
  // diffusers-style config.json objects for UNet2DConditionModel, AutoencoderKL and CLIPTextModel.
  Json unet, vae, text_encoder;
  // file key -> diffusers name of that component's module ("" = a key of another component).
  KeyMap unet_key, vae_key, text_encoder_key;
};

// True when `path` is a regular file (a single-file checkpoint) rather than a model folder.
bool is_single_file_checkpoint(const std::string& path);

// Reads the layout of an SD 1.x single file. Other families and layouts are refused by name (EMODELFILE): SDXL,
// SD3, Flux, SD 2.x (OpenCLIP text encoder), files that lack one of the three components.
SingleFileModel describe_single_file(const WeightSource& src);

}  // namespace tl
