"""The matrix products of one decode or verification step, each backend in turn on the same inputs.

    .venv/bin/python scripts/cpu_kernels_bench.py            # rows 1, 2, 4, 8, 12, 16
    .venv/bin/python scripts/cpu_kernels_bench.py 1 --resident   # each kernel's arithmetic ceiling

SmolLM2-135M's shapes: 30 layers' four products (q|k|v, o, gate|up, down) and the 576x49152 LM head, random
weights, each layer its own matrices so they stream from memory as in a real step (243 MB in bf16). For M rows
(1 = a decode step, more = a draft tree being verified): oneDNN's packed bf16 product (what PackedLinear used
before the workbench's kernels), the workbench's bf16 kernel on the unit the process uses (AMX tiles where the
CPU has them, `kernels.cpu.product_unit()`) and on AVX512-BF16 ("workbench bf16 avx512"), torch's int8
weight-only kernel and the workbench's int8 kernel, and int4 at group 64 in torch's kernel and in the
workbench's; "a8" columns are the workbench's products over int8 activations (`act=int8`: integer dot
products). Best of five 5-step means, backends alternating so drift hits them alike. `--json PATH` also
writes the table.

With --resident, each backend multiplies one 576x1536 weight (down's shape) over and over on one thread, so
the weight stays in the core's L2 and the figure, GB/s of weight bytes over the process's CPU time (which
other processes' load does not inflate), is what the kernel's arithmetic allows, not what memory does.
"""

import argparse
import json
import time

import torch
from torch import nn

from workbench.kernels import cpu

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)
HEAD = (49152, 576)
A8 = {"int8_activations": True}  # the products over int8 activations (act=int8)


def backends(layers: int) -> dict[str, list]:
    calls: dict[str, list] = {"oneDNN bf16": [], "workbench bf16": [], "workbench bf16 avx512": [],
                              "torch int8": [], "workbench int8": [],
                              "workbench int8 a8": [], "torch int4": [], "workbench int4": [], "workbench int4 a8": []}
    for shape in [s for _ in range(layers) for s in LAYER] + [HEAD]:
        n, k = shape
        weight = nn.Linear(k, n, bias=False).weight.detach().to(torch.bfloat16)
        onednn = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        ours = cpu.pack_bf16(weight)
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scales = torch.rand(n, dtype=torch.bfloat16) * 0.01
        packed_codes, scales32 = cpu.pack_int8(codes), scales.float()
        calls["oneDNN bf16"].append((k, lambda x, w=onednn: torch.ops.mkldnn._linear_pointwise(x, w, None, "none",
                                                                                                 [], "")))
        calls["workbench bf16"].append((k, lambda x, w=ours: cpu.gemm_bf16(x, w, None)))
        calls["workbench bf16 avx512"].append((k, lambda x, w=ours: cpu.gemm_bf16(x, w, None)))
        calls["torch int8"].append((k, lambda x, c=codes, s=scales: torch.ops.aten._weight_int8pack_mm(x, c, s)))
        calls["workbench int8"].append((k, lambda x, c=packed_codes, s=scales32: cpu.gemm_int8(x, c, s, None)))
        calls["workbench int8 a8"].append((k, lambda x, c=packed_codes, s=scales32: cpu.gemm_int8(x, c, s, None, **A8)))
        codes4 = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        scale_zeros = torch.rand(k // 64, n, 2, dtype=torch.bfloat16) * 0.01  # torch's (scale, zero) per group
        torch4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4.to(torch.int32), 1)
        ours4, params = cpu.pack_int4(codes4, scale_zeros[..., 0].T, scale_zeros[..., 1].T)
        calls["torch int4"].append((k, lambda x, c=torch4, sz=scale_zeros:
                                    torch.ops.aten._weight_int4pack_mm_for_cpu(x, c, 64, sz)))
        calls["workbench int4"].append((k, lambda x, c=ours4, p=params: cpu.gemm_int4(x, c, p, 64, None)))
        calls["workbench int4 a8"].append((k, lambda x, c=ours4, p=params: cpu.gemm_int4(x, c, p, 64, None, **A8)))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", type=int, default=[1, 2, 4, 8, 12, 16])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--resident", action="store_true", help="one L2-resident weight on one thread (see above)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the workbench's CPU kernels do not run here (no C compiler or no AVX512-BF16)")
    torch.manual_seed(0)
    if args.resident:
        return resident(args.rows)
    calls = backends(args.layers)
    unit = cpu.product_unit()
    print(f"ms per step's products, {args.layers} layers + LM head, {torch.get_num_threads()} threads; "
          f"workbench bf16 on {unit}")
    print(f"{'rows':>5}" + "".join(f"{name:>22}" for name in calls))
    table = []
    with torch.inference_mode():
        for m in args.rows:
            inputs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in (576, 1536)}
            best = dict.fromkeys(calls, float("inf"))
            for _ in range(5):
                for name, fs in calls.items():
                    cpu.use_amx(unit == "amx" and name != "workbench bf16 avx512")
                    start = time.perf_counter()
                    for _ in range(5):
                        for k, f in fs:
                            f(inputs[k])
                    best[name] = min(best[name], (time.perf_counter() - start) / 5)
            cpu.use_amx(unit == "amx")
            table.append({"rows": m, **{name: round(best[name] * 1e3, 3) for name in calls}})
            print(f"{m:>5}" + "".join(f"{best[name] * 1e3:>22.2f}" for name in calls), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"unit": unit, "layers": args.layers, "threads": torch.get_num_threads(), "ms": table}, f,
                      indent=1)


def resident(rows: list[int]) -> None:
    torch.set_num_threads(1)
    n, k = LAYER[3]
    weight = nn.Linear(k, n, bias=False).weight.detach().to(torch.bfloat16)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    codes4, params = cpu.pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8),
                                   *(torch.rand(2, n, k // 32, dtype=torch.bfloat16) * 0.01))
    packed, packed_codes, scales = cpu.pack_bf16(weight), cpu.pack_int8(codes), torch.rand(n)
    calls = {"workbench bf16": (n * k * 2, lambda x: cpu.gemm_bf16(x, packed, None)),
             "workbench int8": (n * k + 4 * n, lambda x: cpu.gemm_int8(x, packed_codes, scales, None)),
             "workbench int8 a8": (n * k + 4 * n, lambda x: cpu.gemm_int8(x, packed_codes, scales, None, **A8)),
             "workbench int4 g32": (codes4.numel() + params.numel() * 2, lambda x: cpu.gemm_int4(x, codes4, params, 32,
                                                                                              None)),
             "workbench int4 g32 a8": (codes4.numel() + params.numel() * 2,
                                       lambda x: cpu.gemm_int4(x, codes4, params, 32, None, **A8))}
    print(f"GB/s of an L2-resident {n}x{k} weight, one thread, process time (best of 7 rounds of 200 products)")
    print(f"{'rows':>5}" + "".join(f"{name:>20}" for name in calls))
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            best = dict.fromkeys(calls, float("inf"))
            for _ in range(7):
                for name, (_, f) in calls.items():
                    start = time.process_time()
                    for _ in range(200):
                        f(x)
                    best[name] = min(best[name], (time.process_time() - start) / 200)
            print(f"{m:>5}" + "".join(f"{calls[name][0] / best[name] / 1e9:>20.1f}" for name in calls), flush=True)


if __name__ == "__main__":
    main()
