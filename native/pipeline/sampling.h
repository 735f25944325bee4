// Text-to-image sampling (diffusers' StableDiffusionPipeline loop), with the scheduler math kept in TypeScript.
//
// A Sampler session holds the latents and the scheduler's history on the torch thread. Every update of the
// supported schedulers (PNDM/PLMS, DDIM eta 0, Euler, Euler ancestral, DPM-Solver++ 2M) is a linear combination of
// named tensor slots ("x" = current latents, "eps" = this step's guided model output, anything else = state the
// program saved earlier) plus optionally Gaussian noise from the session's own generator. TypeScript computes the
// coefficients (src/inference/schedulers.ts) and sends one small op program per step.
//
// Sampling never touches torch's global generators and runs modules in eval mode (no LoRA dropout), restoring
// their train/eval mode afterwards, so a Trainer sharing the Pipeline keeps a bit-identical trajectory.
#pragma once
#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pipeline/pipeline.h"

namespace tl {

struct SamplerOptions {
  torch::Tensor input_ids;           // [P, T] int64: one row per prompt
  torch::Tensor negative_input_ids;  // [P, T] or [1, T] int64 (the empty prompt's ids when there is no negative prompt)
  int64_t images_per_prompt = 1;
  double guidance_scale = 7.5;  // classifier-free guidance only when > 1 (as diffusers)
  int64_t height = 512, width = 512;
  uint64_t seed = 0;
  double init_noise_sigma = 1.0;
  torch::Tensor latents;  // optional initial latents (before init_noise_sigma, as diffusers' `latents=`)
  // Test model (no pipeline): eps = fake_base + fake_input_scale * model_input.
  torch::Tensor fake_base;
  double fake_input_scale = 0;
};

// target = sum(coef * slot) [+ noise_coef * N(0, 1)], optionally clamped; slots are read before target is written.
struct SamplerOp {
  std::string target;
  std::vector<std::pair<std::string, double>> terms;
  std::optional<double> noise;
  std::optional<std::pair<double, double>> clamp;
};

class Sampler {
 public:
  // pipeline may be null only with a fake model.
  Sampler(std::shared_ptr<Pipeline> pipeline, SamplerOptions opts);

  // Runs the model on x * model_input_scale at `timestep`, applies guidance, stores "eps", then runs `ops`.
  void step(double timestep, double model_input_scale, const std::vector<SamplerOp>& ops);
  // VAE decode of x / scaling_factor -> (x / 2 + 0.5).clamp(0, 1) as [B, H, W, 3] float32 on the CPU.
  torch::Tensor decode_images();
  // The current latents as float32 on the CPU (tests).
  torch::Tensor latents() const;
  int64_t batch() const { return batch_; }

 private:
  torch::Tensor eps_for(const torch::Tensor& model_input, double timestep);
  std::shared_ptr<Pipeline> pipe_;
  SamplerOptions opts_;
  torch::ScalarType dtype_ = torch::kFloat32;  // the model's activations
  torch::Device device_ = torch::kCPU;
  at::Generator gen_;
  torch::Tensor prompt_embeds_;  // [2B or B, T, C]: uncond first when guided
  bool guided_ = false;
  int64_t batch_ = 0;
  std::map<std::string, torch::Tensor> slots_;  // float32, on device_
};

}  // namespace tl
