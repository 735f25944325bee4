#include "models/clip_text.h"

#include <cmath>

#include "models/config.h"
#include "runtime/engine.h"
#include "io/weights.h"

namespace tl {
namespace {

using torch::Tensor;

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

}  // namespace

CLIPTextConfig CLIPTextConfig::from_json(const Json& root, const std::string& path) {
  ConfigReader top(root, path);
  // A CLIPModel config carries the text encoder's settings in "text_config".
  const bool nested = root["text_config"].is_object();
  if (top.present("model_type")) {
    const std::string mt = top.string("model_type", "");
    if (mt != "clip_text_model" && !(nested && mt == "clip"))
      top.fail("model_type", "\"" + mt + "\" is not supported (supported: clip_text_model, a CLIPTextModel text encoder)");
  }
  ConfigReader r(nested ? root["text_config"] : root, nested ? path + " (text_config)" : path);
  CLIPTextConfig c;
  c.vocab_size = r.integer("vocab_size", c.vocab_size, 1);
  c.hidden_size = r.integer("hidden_size", c.hidden_size, 1);
  c.intermediate_size = r.integer("intermediate_size", c.intermediate_size, 1);
  c.num_hidden_layers = r.integer("num_hidden_layers", c.num_hidden_layers, 0);
  c.num_attention_heads = r.integer("num_attention_heads", c.num_attention_heads, 1);
  c.max_position_embeddings = r.integer("max_position_embeddings", c.max_position_embeddings, 1);
  c.layer_norm_eps = r.positive("layer_norm_eps", c.layer_norm_eps);
  c.attention_dropout = r.number("attention_dropout", c.attention_dropout);
  if (c.attention_dropout < 0 || c.attention_dropout >= 1) r.fail("attention_dropout", "must be in [0, 1)");
  c.hidden_act = r.enumerated("hidden_act", c.hidden_act, kTransformersActivations);
  if (c.hidden_size % c.num_attention_heads != 0)
    r.fail("num_attention_heads",
           std::to_string(c.num_attention_heads) + " does not divide hidden_size " + std::to_string(c.hidden_size));
  return c;
}

namespace clip {

CLIPAttention::CLIPAttention(const CLIPTextConfig& cfg) : heads(cfg.num_attention_heads), dropout(cfg.attention_dropout) {
  const int64_t d = cfg.hidden_size;
  k_proj = register_module("k_proj", std::make_shared<nn::Linear>(d, d));
  v_proj = register_module("v_proj", std::make_shared<nn::Linear>(d, d));
  q_proj = register_module("q_proj", std::make_shared<nn::Linear>(d, d));
  out_proj = register_module("out_proj", std::make_shared<nn::Linear>(d, d));
}

Tensor CLIPAttention::forward(const Tensor& x) const {
  Tensor q = q_proj->forward(x), k = k_proj->forward(x), v = v_proj->forward(x);
  Tensor o;
  if (dropout > 0 && is_training()) {
    const int64_t b = q.size(0), n = q.size(1), inner = q.size(2), dh = inner / heads;
    auto split = [&](const Tensor& t) { return t.view({b, n, heads, dh}).transpose(1, 2); };
    o = at::scaled_dot_product_attention(split(q), split(k), split(v), {}, dropout, /*is_causal=*/true);
    o = o.transpose(1, 2).reshape({b, n, inner});
  } else {
    o = nn::multi_head_attention(q, k, v, heads, /*causal=*/true);
  }
  return out_proj->forward(o);
}

CLIPMLP::CLIPMLP(const CLIPTextConfig& cfg) : act(cfg.hidden_act) {
  fc1 = register_module("fc1", std::make_shared<nn::Linear>(cfg.hidden_size, cfg.intermediate_size));
  fc2 = register_module("fc2", std::make_shared<nn::Linear>(cfg.intermediate_size, cfg.hidden_size));
}

Tensor CLIPMLP::forward(const Tensor& x) const { return fc2->forward(activate(act, fc1->forward(x))); }

CLIPEncoderLayer::CLIPEncoderLayer(const CLIPTextConfig& cfg) {
  self_attn = register_module("self_attn", std::make_shared<CLIPAttention>(cfg));
  layer_norm1 = register_module("layer_norm1", std::make_shared<nn::LayerNorm>(cfg.hidden_size, cfg.layer_norm_eps));
  mlp = register_module("mlp", std::make_shared<CLIPMLP>(cfg));
  layer_norm2 = register_module("layer_norm2", std::make_shared<nn::LayerNorm>(cfg.hidden_size, cfg.layer_norm_eps));
}

Tensor CLIPEncoderLayer::forward(const Tensor& x) const {
  Tensor h = x + self_attn->forward(layer_norm1->forward(x));
  return h + mlp->forward(layer_norm2->forward(h));
}

CLIPEncoder::CLIPEncoder(const CLIPTextConfig& cfg) {
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) layers.push(std::make_shared<CLIPEncoderLayer>(cfg));
  register_module("layers", layers.holder);
}

CLIPTextEmbeddings::CLIPTextEmbeddings(const CLIPTextConfig& cfg) {
  token_embedding = register_module("token_embedding", std::make_shared<nn::Embedding>(cfg.vocab_size, cfg.hidden_size));
  position_embedding =
      register_module("position_embedding", std::make_shared<nn::Embedding>(cfg.max_position_embeddings, cfg.hidden_size));
}

CLIPTextTransformer::CLIPTextTransformer(const CLIPTextConfig& cfg) {
  embeddings = register_module("embeddings", std::make_shared<CLIPTextEmbeddings>(cfg));
  encoder = register_module("encoder", std::make_shared<CLIPEncoder>(cfg));
  final_layer_norm = register_module("final_layer_norm", std::make_shared<nn::LayerNorm>(cfg.hidden_size, cfg.layer_norm_eps));
}

}  // namespace clip

CLIPTextModel::CLIPTextModel(const CLIPTextConfig& cfg) : config(cfg) {
  text_model = register_module("text_model", std::make_shared<clip::CLIPTextTransformer>(cfg));
}

Tensor CLIPTextModel::forward(const Tensor& input_ids, bool gradient_checkpointing) const {
  if (!input_ids.defined() || input_ids.dim() != 2)
    throw UserError("EINPUT", "text encoder: input_ids must be a [batch, tokens] tensor" +
                                  (input_ids.defined() ? ", got " + std::to_string(input_ids.dim()) + " dimensions" : std::string()));
  if (input_ids.is_floating_point() || input_ids.is_complex() || input_ids.scalar_type() == torch::kBool)
    throw UserError("EINPUT", "text encoder: input_ids must hold integers");
  const auto& emb = *text_model->embeddings;
  const int64_t T = input_ids.size(1);
  if (T > config.max_position_embeddings)
    throw UserError("EINPUT", "text encoder: " + std::to_string(T) + " tokens is more than max_position_embeddings (" +
                                  std::to_string(config.max_position_embeddings) + ")");
  Tensor ids = input_ids.to(emb.token_embedding->weight.device(), torch::kLong);
  if (ids.numel() > 0) {
    // An out-of-range id would be a device-side assert on CUDA: check first (one small reduction).
    auto [lo, hi] = at::aminmax(ids);
    int64_t mn = lo.item<int64_t>(), mx = hi.item<int64_t>();
    if (mn < 0 || mx >= config.vocab_size)
      throw UserError("EINPUT", "text encoder: token id " + std::to_string(mn < 0 ? mn : mx) + " is outside the vocabulary (0.." +
                                    std::to_string(config.vocab_size - 1) + "); does the tokenizer belong to this model?");
  }
  // embeddings: token + position (positions 0..T-1)
  Tensor h = emb.token_embedding->forward(ids) + emb.position_embedding->weight.narrow(0, 0, T).unsqueeze(0);
  const bool ckpt = gradient_checkpointing && torch::GradMode::is_enabled();
  // Reentrant checkpointing only builds a graph when an input requires grad: with a frozen embedding (LoRA in
  // the layers only) make the layer input require grad, as transformers' enable_input_require_grads() does.
  if (ckpt && !h.requires_grad()) h = h.detach().requires_grad_(true);
  for (const auto& layer : text_model->encoder->layers) {
    if (ckpt) {
      std::shared_ptr<clip::CLIPEncoderLayer> l = layer;
      h = nn::checkpoint([l](const std::vector<Tensor>& in) { return std::vector<Tensor>{l->forward(in[0])}; }, {h})[0];
    } else {
      h = layer->forward(h);
    }
  }
  return text_model->final_layer_norm->forward(h);
}

std::shared_ptr<CLIPTextModel> CLIPTextModel::load_from(const CLIPTextConfig& cfg, const WeightSource& src,
                                                        const std::function<std::string(const std::string&)>& rename_key,
                                                        std::optional<torch::ScalarType> dtype, torch::Device device) {
  auto m = std::make_shared<CLIPTextModel>(cfg);
  // Real SD files carry the "text_model." prefix; transformers 5 writes CLIPTextModel without it. The
  // position_ids buffer and the parts of a full CLIPModel file that a CLIPTextModel does not use are ignored.
  auto rename = [rename_key](const std::string& file_key) -> std::string {
    const std::string key = rename_key ? rename_key(file_key) : file_key;
    if (key.empty()) return "";
    for (const char* skip : {"vision_model.", "visual_projection.", "text_projection.", "logit_scale"})
      if (starts_with(key, skip)) return "";
    std::string name = starts_with(key, "text_model.") ? key : "text_model." + key;
    if (name == "text_model.embeddings.position_ids") return "";
    return name;
  };
  load_module(*m, src, {dtype, device, rename}, "text encoder");
  return m;
}

}  // namespace tl
