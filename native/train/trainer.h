// The training step of diffusers' train_text_to_image_lora.py, natively: VAE encode -> latents * scaling_factor,
// noise (+ offset), uniform timesteps, add_noise, text encoder, UNet, (min-SNR weighted) MSE against epsilon or
// velocity, backward; then clipping, AdamW (torch.optim.AdamW semantics) and fp16 dynamic loss scaling.
// Everything that decides (LR schedule, accumulation, data order, checkpoint layout) lives in TypeScript; this
// class exposes all state a checkpoint needs: trainable weights, optimizer moments and steps, scaler, RNG.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "lora/lora.h"
#include "pipeline/pipeline.h"

namespace tl {

// The choices of a run, by the names the CLI and diffusers use (the tables are what the binding accepts).
enum class TrainMode { Lora, Full };
enum class PredictionType { Epsilon, VPrediction };
enum class MixedPrecision { No, FP16, BF16 };
inline const std::vector<std::pair<std::string, TrainMode>> kTrainModes = {{"lora", TrainMode::Lora}, {"full", TrainMode::Full}};
inline const std::vector<std::pair<std::string, PredictionType>> kPredictionTypes = {{"epsilon", PredictionType::Epsilon},
                                                                                      {"v_prediction", PredictionType::VPrediction}};
inline const std::vector<std::pair<std::string, MixedPrecision>> kMixedPrecisions = {
    {"no", MixedPrecision::No}, {"fp16", MixedPrecision::FP16}, {"bf16", MixedPrecision::BF16}};

struct TrainerConfig {
  TrainMode mode = TrainMode::Lora;
  nn::LoraOptions lora;
  std::vector<std::string> lora_targets{"to_k", "to_q", "to_v", "to_out.0"};
  // --train-text-encoder: LoRA (same rank/alpha/dropout/init) on the text encoder's Linear modules matching
  // text_encoder_targets (peft's rule). Its parameters form their own AdamW group (optimizer_step's te_lr); the
  // text encoder then runs with grad, under the UNet's autocast and gradient checkpointing (as accelerate prepares
  // it in diffusers' dreambooth LoRA scripts), and the text-embedding cache is bypassed (valid only while frozen).
  bool train_text_encoder = false;
  std::vector<std::string> text_encoder_targets{"q_proj", "k_proj", "v_proj", "out_proj"};
  // Rank/alpha of 3x3 conv adapters (LoCon: --conv-rank/--conv-alpha); absent = no 3x3 conv may be targeted.
  std::optional<nn::LoraOptions> conv_lora;
  // no | fp16 | bf16: the UNet's forward runs under autocast in that dtype (torch.autocast, as accelerate wraps the
  // prepared model); LoRA and full-mode weights stay fp32 (master weights), frozen weights are whatever dtype the
  // pipeline was loaded in. fp16 adds dynamic loss scaling.
  MixedPrecision mixed_precision = MixedPrecision::No;
  bool gradient_checkpointing = false;
  PredictionType prediction_type = PredictionType::Epsilon;
  double noise_offset = 0;
  std::optional<double> snr_gamma;
  std::vector<float> alphas_cumprod;  // from the DDPM noise schedule (TypeScript computes it from scheduler_config.json)
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_weight_decay = 1e-2, adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;  // <= 0: no clipping
  uint64_t seed = 0;
  // fp16 dynamic loss scaling (torch.amp.GradScaler's parameters and defaults)
  double init_loss_scale = 65536.0, growth_factor = 2.0, backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  // Text-encoder outputs kept per distinct token sequence while the text encoder is frozen (LRU, bytes); 0 disables.
  // Each caption is encoded on its own (batch of 1), so an embedding does not depend on what shared its batch or on
  // what the cache held: a resumed run computes exactly what an uninterrupted one does.
  int64_t text_embedding_cache_bytes = int64_t(1) << 30;
  // Capture the UNet forward + loss + backward in CUDA graphs, one per input shape (cuda_graph.h); eager elsewhere.
  bool cuda_graphs = false;
};

// Whether the micro-steps run from CUDA graphs (native/cuda_graph.h), and why not.
struct StepGraphStatus {
  bool requested = false;
  bool active = false;  // graphs are (or will be) used for new shapes
  std::string reason;   // why not, or why the last capture failed
  int64_t graphs = 0;   // captured shapes
  int64_t replays = 0;  // micro-steps run from a graph
  int64_t eager = 0;    // micro-steps run eagerly while requested (warm-up, failed shapes)
};
// Defined in cuda_graph.h, which only trainer.cpp includes (its layout depends on the CUDA build).
class StepGraphs;

struct MicroBatch {
  torch::Tensor pixel_values;                 // [B,3,H,W] in [-1,1], or
  torch::Tensor latent_mean, latent_std;      // cached VAE posterior (before scaling_factor)
  torch::Tensor input_ids;                    // [B,77] int64, or
  torch::Tensor encoder_hidden_states;        // cached text embeddings
  // Test hooks for parity with a reference: use these instead of sampling.
  torch::Tensor latents, noise, timesteps;
  // --masked-loss: per-sample weights at latent size [B,1,h,w] in [0,1] multiplying the per-element loss (kohya's
  // apply_masked_loss: the weighted loss is then averaged over all elements, not over the mask's sum). Optional.
  torch::Tensor loss_mask;
  double loss_divisor = 1.0;  // gradient accumulation steps
};

struct StepResult {
  double grad_norm = 0;  // before clipping (after unscaling)
  bool skipped = false;     // no update (non-finite gradients), the LR schedule must not advance
  bool non_finite = false;  // the gradients held inf/NaN (fp16: an overflow, the loss scale was lowered)
  double loss_scale = 1;
  int64_t optimizer_steps = 0;
};

class Trainer {
 public:
  Trainer(std::shared_ptr<Pipeline> pipeline, TrainerConfig cfg);

  // Forward + backward of one micro-batch; gradients accumulate. Returns the loss (not divided).
  double micro_step(const MicroBatch& b);
  // Clip, AdamW step with this learning rate (te_lr for the text encoder's parameters; default lr), zero the gradients.
  StepResult optimizer_step(double lr, std::optional<double> te_lr = std::nullopt);
  void zero_grad();

  // Validation loss without gradients (fixed noise/timesteps given by the caller).
  double eval_loss(const MicroBatch& b);

  // --- checkpoint state ---
  // Trainable parameters keyed by name (LoRA: "unet.<path>.lora_A.weight" peft keys; full: UNet names).
  NamedTensors trainable_state() const;
  void load_trainable_state(const NamedTensors& t, const std::string& what);
  // AdamW moments keyed "<param>.exp_avg" / "<param>.exp_avg_sq"; per-parameter step counts.
  NamedTensors optimizer_tensors() const;
  std::map<std::string, int64_t> optimizer_steps() const;
  void load_optimizer(const NamedTensors& t, const std::map<std::string, int64_t>& steps, const std::string& what);
  void reset_optimizer();
  struct ScalerState {
    double scale = 1;
    int64_t growth_tracker = 0;
    bool enabled = false;
  };
  ScalerState scaler() const { return scaler_; }
  void set_scaler(const ScalerState& s) { scaler_ = s; }
  // Every RNG stream torch uses here: "cpu" and "cuda:N" generator states.
  std::vector<std::pair<std::string, std::vector<uint8_t>>> rng_state() const;
  void set_rng_state(const std::vector<std::pair<std::string, std::vector<uint8_t>>>& s);

  // Data parallelism (set by the distributed bindings). Every rank draws the random tensors of the whole global
  // batch (world_size micro-batches of the same size) from its identically seeded generator and keeps its own rows,
  // so N ranks draw exactly what one process with an N-times larger batch would. reduce_grads averages the
  // gradients over the ranks before unscaling, clipping and AdamW.
  struct DataParallel {
    int64_t rank = 0, world_size = 1;
    std::function<void(std::vector<torch::Tensor>&)> reduce_grads;
  };
  DataParallel data_parallel;

  // The dtype autocast runs the UNet in, or nullopt for fp32.
  std::optional<at::ScalarType> autocast_dtype() const;

  int64_t trainable_count() const;
  int64_t total_count() const;
  const TrainerConfig& config() const { return cfg_; }
  // Whether the micro-steps run from CUDA graphs, and why not.
  StepGraphStatus graph_status() const;
  Pipeline& pipeline() { return *pipe_; }

 private:
  // The UNet's inputs of a micro-batch (everything random or data-dependent, computed eagerly).
  struct UnetInputs {
    torch::Tensor noisy, timesteps, ehs, target, mask;
  };
  torch::Tensor randn_rows(c10::IntArrayRef sizes, const torch::TensorOptions& o) const;
  torch::Tensor latents_for(const MicroBatch& b, std::vector<int64_t>& global_strides);
  // With `inputs_only`, stops before the UNet and fills it (the loss returned is undefined).
  torch::Tensor loss_for(const MicroBatch& b, bool train, UnetInputs* inputs_only = nullptr);
  // `mask` (--masked-loss, [B,1,h,w] at the latent size) may be undefined.
  torch::Tensor unet_loss(const torch::Tensor& noisy, const torch::Tensor& timesteps, const torch::Tensor& ehs, const torch::Tensor& target,
                          const torch::Tensor& mask, bool train);
  std::shared_ptr<StepGraphs> graphs_;  // shared_ptr: deleted with trainer.cpp's complete type
  torch::Tensor text_embeddings(const torch::Tensor& input_ids);
  struct CachedEmbedding {
    torch::Tensor value;
    std::list<std::string>::iterator lru;
  };
  std::unordered_map<std::string, CachedEmbedding> text_cache_;
  // Strides of a 2-row batch's latents by pixel size (data parallel with one row per rank; see loss_for).
  std::map<std::vector<int64_t>, std::vector<int64_t>> global_layout_;
  std::list<std::string> text_lru_;  // most recently used first
  int64_t text_cache_used_ = 0;
  std::shared_ptr<Pipeline> pipe_;
  TrainerConfig cfg_;
  std::vector<std::pair<std::string, torch::Tensor>> params_;  // trainable, in a fixed order
  size_t te_params_begin_ = SIZE_MAX;  // params_[i] with i >= this are the text encoder's (--train-text-encoder)
  std::map<std::string, torch::Tensor> exp_avg_, exp_avg_sq_;
  std::map<std::string, int64_t> steps_;
  ScalerState scaler_;
  torch::Tensor alphas_cumprod_;
  int64_t optimizer_step_count_ = 0;
};

}  // namespace tl
