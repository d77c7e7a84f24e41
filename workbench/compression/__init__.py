"""Weight transforms (slice, quantize, prune, encode, compensate). Importing this package registers them.

The contract (compressed layers, transforms, their application in stage order) is in `base.py`;
docs/compression.md describes each transform and how to measure it.
"""

from workbench.compression import (  # noqa: F401  (registration)
    adapter1bit,
    compeft,
    dare,
    decoupleq,
    delta,
    dfloat11,
    eora,
    fp4,
    gptq,
    int4,
    int8,
    mx,
    prune,
    prunenet,
    pvtune,
)
from workbench.compression.base import STAGES, CompressedLinear, WeightTransform, apply_compression

__all__ = ["STAGES", "CompressedLinear", "WeightTransform", "apply_compression"]
