"""Golden text-to-image outputs of diffusers' StableDiffusionPipeline on the tiny fixture model.

Run:  PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/make_pipeline_goldens.py
Writes test/fixtures/sampling/pipeline_golden.safetensors (diffusers is imported, never copied): per case the
float images (output_type="np", [B, H, W, 3]) under "<case>.images" and the prompt token ids under
"<case>.input_ids" / "<case>.negative_input_ids"; the metadata key "cases" holds the JSON list of case settings.

The pipeline is built from test/fixtures/models/tiny (safety_checker None); each case runs with
generator=torch.Generator().manual_seed(seed) on the CPU, in fp32.
"""
import json
import sys

sys.modules.setdefault("torchvision", None)

import torch  # noqa: E402
from common import FIXTURES, REPO, SCHEDULERS, tiny_pipeline, versions  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = FIXTURES / "sampling" / "pipeline_golden.safetensors"

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]
NEGATIVE = "blurry, low quality"

CASES = [
    {"name": "pndm", "scheduler": "pndm", "numImagesPerPrompt": 2, "lora": None, "loraScale": 1.0},
    {"name": "euler_a", "scheduler": "euler_a", "numImagesPerPrompt": 1, "lora": None, "loraScale": 1.0},
    {"name": "dpmpp_2m_lora", "scheduler": "dpmpp_2m", "numImagesPerPrompt": 1,
     "lora": "test/fixtures/golden/tiny/pytorch_lora_weights.safetensors", "loraScale": 0.7},
]
COMMON = {"prompts": PROMPTS, "negativePrompt": NEGATIVE, "width": 64, "height": 64, "numInferenceSteps": 5,
          "guidanceScale": 7.5, "seed": 0}


def main():
    tensors = {}
    cases = []
    for case in CASES:
        lora = REPO / case["lora"] if case["lora"] else None
        pipe = tiny_pipeline(lora.parent, lora.name) if lora else tiny_pipeline()
        pipe.scheduler = SCHEDULERS[case["scheduler"]].from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"cross_attention_kwargs": {"scale": case["loraScale"]}} if lora else {}
        tok = pipe.tokenizer
        ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        neg = tok([NEGATIVE] * len(PROMPTS), padding="max_length", max_length=ids.shape[1], truncation=True, return_tensors="pt").input_ids
        out = pipe(
            PROMPTS,
            negative_prompt=[NEGATIVE] * len(PROMPTS),
            num_images_per_prompt=case["numImagesPerPrompt"],
            width=COMMON["width"],
            height=COMMON["height"],
            num_inference_steps=COMMON["numInferenceSteps"],
            guidance_scale=COMMON["guidanceScale"],
            generator=torch.Generator().manual_seed(COMMON["seed"]),
            output_type="np",
            **kwargs,
        )
        images = torch.from_numpy(out.images).contiguous()
        tensors[case["name"] + ".images"] = images
        tensors[case["name"] + ".input_ids"] = ids.to(torch.int64).contiguous()
        tensors[case["name"] + ".negative_input_ids"] = neg.to(torch.int64).contiguous()
        cases.append({**COMMON, **case})
        print(case["name"], tuple(images.shape), float(images.mean()), float(images.std()))
    meta = {"cases": json.dumps(cases), **versions("torch", "diffusers")}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
