"""ComPEFT: a fine-tune's delta sparsified to its largest entries and quantized to a sign and one scale.

Paper: "ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and
Quantization", Yadav et al., arXiv 2311.13171.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench.compression.delta import DeltaCodec, DeltaTransform, dense_entry, pack_bits, tensor_nbytes, unpack_bits
from workbench.registry import param, register


class CompeftDelta(DeltaCodec):
    """ΔW [out, in] = scale · sign where kept: a bitmap of the kept positions (1 bit per entry), the signs of
    the kept entries (1 bit each, row-major order) and one scale, all in buffers."""

    capturable = False  # decode counts the kept entries on the host and indexes by a boolean mask

    def __init__(self, kept: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]):
        super().__init__()
        self.register_buffer("kept", kept)  # uint8 [ceil(out·in / 8)]
        self.register_buffer("signs", signs)  # uint8 [ceil(k / 8)], 1 = positive
        self.register_buffer("scale", scale)  # [1] in the model's dtype
        self.shape = shape

    def decode(self) -> torch.Tensor:
        mask = unpack_bits(self.kept, self.shape[0] * self.shape[1])
        positive = unpack_bits(self.signs, int(mask.sum()))
        out = torch.zeros(mask.shape, dtype=self.scale.dtype, device=self.scale.device)
        out[mask] = torch.where(positive, self.scale, -self.scale)
        return out.view(self.shape)

    def nbytes(self) -> int:
        return tensor_nbytes(self.kept, self.signs, self.scale)


def compeft(delta: torch.Tensor, density: float, alpha: float, dtype: torch.dtype) -> CompeftDelta:
    """ComPEFT of ΔW [out, in]: keep the round(density · n) largest magnitudes, store their signs and one scale:
    α · std(ΔW) (the paper's) when alpha > 0, else the kept entries' mean magnitude (least squares for signs)."""
    flat = delta.reshape(-1).float()
    k = max(1, round(density * flat.numel()))
    top = flat.abs().topk(k).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[top] = True
    kept = flat[mask]
    scale = alpha * flat.std() if alpha > 0 else kept.abs().mean()
    return CompeftDelta(pack_bits(mask), pack_bits(kept > 0), scale.reshape(1).to(dtype), tuple(delta.shape))


@register("compression", "compeft", lossless=False)
@dataclass
class ComPEFT(DeltaTransform):
    """ComPEFT (Yadav et al., arXiv 2311.13171): compresses the cached fine-tune's delta ΔW = W_ft − W_base
    (see `finetune`) by sparsification and ternary quantization.

    Per linear, only the `density` fraction of delta entries with the largest magnitudes is kept, and each kept
    entry becomes its sign times one scale for the whole tensor (the paper's α·σ(ΔW) with α = `alpha`, or,
    with alpha=0, the kept entries' mean magnitude, which minimises the squared error of a sign code). Stored
    bytes: a bitmap of the kept positions (1 bit per entry), 1 bit per kept sign and the scale: about
    (1 + density) / 16 of a bf16 delta. The paper encodes the positions with Golomb coding, smaller than the
    bitmap at low density; that and its tuning of α on validation data are left out (decoded per call:
    simulated speed).
    """

    density: float = param(0.1, "fraction of each delta's entries kept (largest magnitudes)", min=0.0001, max=1.0)
    alpha: float = param(0.0, "scale = alpha × std(delta) as in the paper; 0 = the kept entries' mean magnitude",
                         min=0.0, max=100.0)

    def codec(self, name: str, entry: dict[str, Any], dtype: torch.dtype) -> DeltaCodec:
        return compeft(dense_entry(entry), self.density, self.alpha, dtype)
