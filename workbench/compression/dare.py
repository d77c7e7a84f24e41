"""DARE: drop a fine-tune's delta parameters at random and rescale the rest.

Paper: "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
Yu et al., arXiv 2311.03099 (DARE); its limits are studied in "DARE the Extreme", Deng et al., arXiv 2410.09344.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch

from workbench.compression.delta import DeltaCodec, DeltaTransform, dense_entry, tensor_nbytes
from workbench.registry import param, register


def dare_mask(shape: tuple[int, int], p: float, seed: int) -> torch.Tensor:
    """The kept positions [out, in] (bool): each entry dropped with probability p, drawn by torch's CPU
    generator from `seed`, so the mask is rebuilt from the seed alone."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) >= p


class DareDelta(DeltaCodec):
    """ΔW stored as the kept entries' rescaled values [kept] (row-major order) and the seed of the mask."""

    capturable = False  # the mask is drawn on the CPU, and indexing by it sizes by the data

    def __init__(self, values: torch.Tensor, shape: tuple[int, int], p: float, seed: int):
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("seed", torch.tensor([seed], dtype=torch.int64))  # the mask, as its 8-byte seed
        self.shape, self.p = shape, p

    def decode(self) -> torch.Tensor:
        mask = dare_mask(self.shape, self.p, int(self.seed)).to(self.values.device)
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        out[mask] = self.values
        return out

    def nbytes(self) -> int:
        return tensor_nbytes(self.values, self.seed)


def dare(delta: torch.Tensor, p: float, seed: int, dtype: torch.dtype) -> DareDelta:
    """DARE of ΔW [out, in]: drop with probability p, keep the rest times 1 / (1 − p), in `dtype`."""
    mask = dare_mask(tuple(delta.shape), p, seed).to(delta.device)
    return DareDelta((delta[mask] / (1 - p)).to(dtype), tuple(delta.shape), p, seed)


@register("compression", "dare", lossless=False)
@dataclass
class Dare(DeltaTransform):
    """DARE (Yu et al., "Language Models are Super Mario", arXiv 2311.03099): compresses the cached fine-tune's
    delta ΔW = W_ft − W_base (see `finetune`) by Drop And REscale.

    Every delta entry is dropped independently with probability `p` and the survivors are multiplied by
    1 / (1 − p), so the delta's expected value, and each layer's expected output change, stay as they were;
    the paper finds fine-tuned deltas redundant enough that p = 0.9 keeps most of a fine-tune's ability. Stored
    bytes: the kept values in the model's dtype (about (1 − p) of the dense delta) plus the 8-byte seed from
    which the random mask is drawn again when the layer runs (decoded per call: simulated speed). With a
    `lora` fine-tune the dense ΔW = B A is what is dropped. Left out: DAREx's modified rescaling factor and
    its delta regularisation during training (arXiv 2410.09344), and merging several DARE'd models.
    """

    p: float = param(0.9, "probability of dropping each delta entry (0 keeps the delta exactly)", min=0.0,
                     max=0.999)
    seed: int = param(0, "seed of the random masks (each linear's mask is drawn from it and the linear's name)",
                      min=0)

    def codec(self, name: str, entry: dict[str, Any], dtype: torch.dtype) -> DeltaCodec:
        return dare(dense_entry(entry), self.p, self.seed * 1_000_003 + zlib.crc32(name.encode()), dtype)
