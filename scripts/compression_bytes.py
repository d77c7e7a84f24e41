"""Weight bytes of the decoder's linear layers (and of the whole model) after each transform chain, as a
fraction of bf16: the issue's "linear-layer bytes" bars. No timing; runs in seconds.

    .venv/bin/python scripts/compression_bytes.py int4:group=64 int4:group=32 int8 dfloat11
"""

from __future__ import annotations

import argparse

from workbench.compression.base import apply_compression, linear_sites, weight_nbytes
from workbench.models import load_model
from workbench.spec import TechniqueSpec


def linear_bytes(model) -> int:
    return sum(weight_nbytes(site.module) for site in linear_sites(model, head=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chains", nargs="+")
    args = parser.parse_args()
    base = load_model(dtype="bfloat16", device="cpu")
    base_linear, base_total = linear_bytes(base.model), base.weight_bytes()
    print(f"bf16: decoder linear layers {base_linear / 1e6:.1f} MB, whole model {base_total / 1e6:.1f} MB")
    print(f"{'chain':<24} {'linear MB':>10} {'of bf16':>8} {'model MB':>9} {'of bf16':>8}")
    for chain in args.chains:
        loaded = load_model(dtype="bfloat16", device="cpu")
        apply_compression(loaded, [TechniqueSpec.parse(t) for t in chain.split("+")])
        lin, total = linear_bytes(loaded.model), loaded.weight_bytes()
        print(f"{chain:<24} {lin / 1e6:>10.1f} {lin / base_linear:>7.1%} "
              f"{total / 1e6:>9.1f} {total / base_total:>7.1%}")


if __name__ == "__main__":
    main()
