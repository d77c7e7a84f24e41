"""One of the workbench's CPU kernel paths on and off in the same process, alternating: the time of a forward of
1 and 11 tokens (a prompt-lookup draft) after 100 cached ones, random weights of SmolLM2-135M's shapes, bf16.

    cd scripts && python kernel_ab.py rows    # RMSNorm (with the residual add) and SwiGLU
    cd scripts && python kernel_ab.py rope    # RoPE
    cd scripts && python kernel_ab.py layer --cached 300 --drafted 0 5 10   # the one-call decoder layer

Off means the layer takes its other path (the check that picks the kernel answers no; for `layer`, the
layer's separate calls). Best of five 15-forward means per side.
"""

import argparse

import torch
from decode_step_breakdown import cached_model, chain_inputs, forward_ms

from workbench.kernels import backend_torch, cpu, dispatch

# what each name switches among the bf16 operations (`dispatch.kernels`); off, the torch reference stands in (for
# `layer`, the check that picks the one-call layers answers no). For rows and rope both sides run the layers one
# by one, so that only that operation differs.
SWITCHES = {"rows": ("add_rms_norm", "rms_norm", "swiglu"), "rope": ("rope",), "layer": ("fuses",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=sorted(SWITCHES))
    parser.add_argument("--cached", type=int, default=100)
    parser.add_argument("--drafted", type=int, nargs="+", default=[0, 10])
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the workbench's CPU kernels do not run here (no C compiler or no AVX512-BF16)")
    ops = dispatch.kernels(torch.device("cpu"), torch.bfloat16)
    if args.kernel != "layer":
        ops.fuses = lambda *a: False
    on = {name: getattr(ops, name) for name in SWITCHES[args.kernel]}
    off = {name: getattr(backend_torch, name, lambda *a: False) for name in on}
    model, cache = cached_model(args.cached)
    for drafted in args.drafted:
        inputs = chain_inputs(drafted, args.cached)
        best = {"kernel": float("inf"), "other path": float("inf")}
        for _ in range(5):
            for side in best:
                for name in on:
                    setattr(ops, name, on[name] if side == "kernel" else off[name])
                best[side] = min(best[side], forward_ms(model, cache, *inputs))
        print(f"{drafted + 1:>2} tokens: kernel {best['kernel']:.2f} ms, other path {best['other path']:.2f} ms")
    dispatch.reset()  # the operations as resolved, for whatever runs next in this process


if __name__ == "__main__":
    main()
