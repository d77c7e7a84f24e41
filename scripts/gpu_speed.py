"""Plain decoding speed on a GPU against transformers' generate, same random weights of SmolLM2-135M's
shapes (no model file can reach the lent GPU machine), bf16, greedy, 128 new tokens, in one process.

    python scripts/gpu_speed.py --out results.json
"""

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from workbench.engine import Engine
from workbench.models.config import ModelConfig
from workbench.models.random import tiny_hf_config
from workbench.models.weights import model_from_hf_state_dict
from workbench.spec import RunSpec

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    cfg = tiny_hf_config("smollm", **SMOLLM2_135M)
    torch.manual_seed(0)
    peer = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16).to(args.device).eval()
    state = {k: v.clone() for k, v in peer.state_dict().items()}
    ours = model_from_hf_state_dict(ModelConfig.from_hf(cfg), state, torch.bfloat16, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    prompt = torch.randint(0, 49152, (60,)).tolist()
    spec = RunSpec(max_new_tokens=args.new)

    def run_ours() -> float:
        t0 = time.perf_counter()
        n = sum(len(e.tokens) for e in Engine(ours, spec).run(prompt))
        sync()
        return n / (time.perf_counter() - t0)

    @torch.inference_mode()
    def run_peer() -> float:
        ids = torch.tensor([prompt], device=args.device)
        t0 = time.perf_counter()
        out = peer.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.new,
                            min_new_tokens=args.new, pad_token_id=0)
        sync()
        return (out.shape[1] - len(prompt)) / (time.perf_counter() - t0)

    run_ours(), run_peer()  # warm-up
    rates = {"workbench": [], "transformers": []}
    for _ in range(args.repeats):
        rates["workbench"].append(run_ours())
        rates["transformers"].append(run_peer())
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"device": name, "torch": torch.__version__, "dtype": "bfloat16",
              "new_tokens": args.new, "prompt_tokens": len(prompt),
              "tok_per_s": {k: sorted(v)[len(v) // 2] for k, v in rates.items()}, "runs": rates}
    result["speedup"] = result["tok_per_s"]["workbench"] / result["tok_per_s"]["transformers"]
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
