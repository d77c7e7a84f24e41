"""Where a plain decoding step's time goes, per weight format: the one-call decoder layers and the final norm
with the LM head (each timed around its call, so it is the C kernels' time), the model's other work in its
forward (Python around the C calls: the embedding, the RoPE tables, each layer's row of pointers, the logits'
conversion), and the engine's step outside the forward (sampling, the trace's figures, the cache's, the text).

Greedy, one prompt, EOS ignored, after a warm-up run; ms per new token, prefill included (a few percent).

    python scripts/decode_time_split.py bf16 int8:act=int8 [--tokens 128]
"""

import argparse
import time

from workbench.api import Workbench
from workbench.kernels import cpu
from workbench.models.llama import LlamaModel

PROMPT = "Explain how a hash table works, and why lookups are fast on average."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("formats", nargs="*", default=["bf16", "int8:act=int8"],
                        help="weight formats: bf16 or a compression chain")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    args = parser.parse_args()
    spent: dict[str, float] = {}

    def timed(name, fn):
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return run

    originals = cpu.decoder_layers, LlamaModel.forward, LlamaModel.logits
    cpu.decoder_layers = timed("layers", cpu.decoder_layers)
    LlamaModel.forward, LlamaModel.logits = timed("forward", LlamaModel.forward), timed("head", LlamaModel.logits)
    try:
        wb = Workbench(args.model, dtype="bfloat16", device="cpu") if args.model else Workbench(dtype="bfloat16")
        # a random test model has no tokenizer: it takes token ids
        prompt = PROMPT if wb.model(wb.spec("")).tokenizer is not None else " ".join(map(str, range(5, 40)))
        print(f"ms per token, {args.tokens} tokens: layers | norm + LM head | rest of the forward | engine | whole")
        for name in args.formats:
            spec = f"{'' if name == 'bf16' else 'compress=' + name + ';'}ignore_eos=true"
            wb.generate(prompt, f"{spec};max_new_tokens=8")
            spent.clear()
            start = time.perf_counter()
            wb.generate(prompt, f"{spec};max_new_tokens={args.tokens}")
            per = {k: v / args.tokens * 1e3 for k, v in spent.items()}
            whole = (time.perf_counter() - start) / args.tokens * 1e3
            layers, head, forward = per.get("layers", 0.0), per.get("head", 0.0), per.get("forward", 0.0)
            print(f"{name:<36} {layers:7.2f} {head:7.2f} {forward - layers - head:7.2f} {whole - forward:7.2f} "
                  f"{whole:7.2f}", flush=True)
    finally:
        cpu.decoder_layers, LlamaModel.forward, LlamaModel.logits = originals


if __name__ == "__main__":
    main()
