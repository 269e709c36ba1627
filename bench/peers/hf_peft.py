#!/usr/bin/env python3
"""HF transformers + PEFT mixed-adapter generation: the peer `inlaid bench` is compared with.

Builds a model of one of the shapes in bench/configs/ with random bf16 weights on the GPU,
adds K LoRA adapters of rank r on all seven projections (random A and B, so they are not
no-ops), and times greedy generation of B prompts of P random tokens, exactly G new tokens
each, in one generate() call:

  mixed-adapters  generate(..., adapter_names=[round-robin]): PEFT's mixed-batch LoRA
  no-adapters     the same model under `disable_adapter()`: the base model alone

One JSON line per case on stdout. Runs only on the GPU machine (torch with CUDA,
transformers, peft); the flags mirror `inlaid bench`:

  python bench/peers/hf_peft.py --config bench/configs/llama-2-7b/config.json \
      --batch 32 --prompt-len 128 --gen 128 --adapters 8 --rank 16
"""

import argparse
import json
import os
import sys
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP_GEN = 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="bench/configs/NAME/config.json (or its folder)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--adapters", type=int, default=8, help="LoRA adapters, round-robin over the requests (0 = base only)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def model_name(config_path: str) -> str:
    """bench/configs/llama-2-7b/config.json (or the folder) -> llama-2-7b."""
    path = os.path.abspath(config_path)
    return os.path.basename(os.path.dirname(path) if path.endswith(".json") else path)


def build_model(config_path: str, adapters: int, rank: int):
    folder = config_path if os.path.isdir(config_path) else os.path.dirname(os.path.abspath(config_path))
    config = AutoConfig.from_pretrained(folder)
    # Allocate (and randomly initialize) straight on the GPU, in bf16: no fp32 copy on the host.
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(torch.float32)
    model.to(torch.bfloat16)
    if adapters == 0:
        # A single adapter keeps the PeftModel API (disable_adapter) for the no-adapters case.
        adapters = 1

    def lora() -> LoraConfig:
        # init_lora_weights=False: random A and B (PEFT's default B = 0 would make every adapter a no-op).
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                          init_lora_weights=False, task_type="CAUSAL_LM")

    model = get_peft_model(model, lora(), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", lora())
    # PEFT may keep adapter weights in fp32; serve them in bf16 like the base.
    model.to(torch.bfloat16)
    model.eval()  # adapter_names is refused in training mode
    return model, config


def generate(model, input_ids: torch.Tensor, gen: int, adapter_names) -> float:
    """Seconds for one generate() call of exactly `gen` new tokens per row, greedy."""
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                  max_new_tokens=gen, min_new_tokens=gen, pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if adapter_names is None:
            with model.disable_adapter():
                out = model.generate(**kwargs)
        else:
            out = model.generate(**kwargs, adapter_names=adapter_names)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    expected = (input_ids.shape[0], input_ids.shape[1] + gen)
    if tuple(out.shape) != expected:
        sys.exit(f"hf_peft.py: generate returned {tuple(out.shape)}, expected {expected}")
    return seconds


def main() -> None:
    a = parse_args()
    if not torch.cuda.is_available():
        sys.exit("hf_peft.py: needs a CUDA GPU (it measures the GPU peer of inlaid bench)")
    model, config = build_model(a.config, a.adapters, a.rank)
    g = torch.Generator(device="cuda").manual_seed(a.seed)
    input_ids = torch.randint(0, config.vocab_size, (a.batch, a.prompt_len), device="cuda", generator=g)
    names = [f"a{i % a.adapters}" for i in range(a.batch)] if a.adapters > 0 else None

    cases = ([("mixed-adapters", names)] if names else []) + [("no-adapters", None)]
    for case, adapter_names in cases:
        generate(model, input_ids, min(a.gen, WARMUP_GEN), adapter_names)  # warm-up, not timed
        seconds = generate(model, input_ids, a.gen, adapter_names)
        print(json.dumps({
            "bench": "hf_peft",
            "case": case,
            "model": model_name(a.config),
            "batch": a.batch,
            "prompt_len": a.prompt_len,
            "gen": a.gen,
            "adapters": a.adapters if adapter_names else 0,
            "rank": a.rank if adapter_names else 0,
            "seconds": round(seconds, 3),
            "output_tokens_per_s": round(a.batch * a.gen / seconds, 1),
            "total_tokens_per_s": round(a.batch * (a.prompt_len + a.gen) / seconds, 1),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "gpu": torch.cuda.get_device_name(),
        }), flush=True)


if __name__ == "__main__":
    main()
