"""A fine-tune's delta on top of the loaded (base) model, as it is or compressed: the shared part of the
delta transforms `finetune` (here), `dare`, `compeft` and `adapter1bit` (one file each).

The base is the model the spec loads; the delta is the cached result of `workbench finetune` for that model
(training/finetune.py), found by the model's fingerprint and the delta's settings, which the transform's
`tune`, `tune_rank` and `tune_layers` name. So `--compress dare:p=0.9` is "the base model plus the cached full
fine-tune's delta, compressed by DARE", and `--compress int8+dare:p=0.9` puts it on an int8 base: the delta
transforms run in the `compensate` stage, after the base's own compression, and wrap whatever linear is there.

Each tuned linear becomes a `DeltaLinear`: y = base(x) + delta(x), where the delta is a `DeltaCodec` holding
its compressed form in buffers (real bytes) and decoding it when the layer runs. `delta_bytes(model)` adds up
the compressed bytes and the uncompressed delta's (`reference_nbytes`: the dense ΔW of a `full` tune, the two
LoRA factors of a `lora` tune, in the model's dtype), the ratio the bars are about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.compression.base import (
    CompressedLinear,
    CompressionContext,
    TiedEmbedding,
    WeightTransform,
    dense_weight,
    linear_sites,
    parse_layers,
    selects,
    weight_nbytes,
)
from workbench.errors import SpecError
from workbench.registry import param, register


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans (any shape, read flat) -> uint8 [ceil(n / 8)], eight to a byte, first bit highest."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -len(flat) % 8)).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n / 8)] -> the first n booleans [n]."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def tensor_nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DeltaCodec(nn.Module):
    """One linear's delta in some stored form. `decode()` is ΔW [out, in] in the compute dtype, `apply(x)` its
    product x ΔWᵀ, `nbytes()` the bytes really held; `simulated` when the product decodes ΔW on every call;
    `capturable` as CompressedLinear's (a decode through boolean masks cannot be recorded in a CUDA graph)."""

    simulated = True
    capturable = True

    def decode(self) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.decode().to(x.dtype))

    def nbytes(self) -> int:
        raise NotImplementedError


class DenseDelta(DeltaCodec):
    """ΔW as it is, [out, in] in the model's dtype."""

    simulated = False

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.register_buffer("delta", delta)

    def decode(self) -> torch.Tensor:
        return self.delta

    def nbytes(self) -> int:
        return tensor_nbytes(self.delta)


class LoraDelta(DeltaCodec):
    """ΔW = scale · B A with A [r, in] and B [out, r] in the model's dtype: two thin products per call."""

    simulated = False

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.scale = scale

    def decode(self) -> torch.Tensor:
        return (self.b.float() @ self.a.float() * self.scale).to(self.a.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype)) * self.scale

    def nbytes(self) -> int:
        return tensor_nbytes(self.a, self.b)


class DeltaLinear(CompressedLinear):
    """y = base(x) + delta(x): any linear (compressed or not) plus a fine-tune's delta in a `DeltaCodec`.
    `reference_nbytes` is the uncompressed delta's size (what the compressed one is measured against)."""

    def __init__(self, base: nn.Module, codec: DeltaCodec, reference_nbytes: int):
        super().__init__()
        self.base, self.codec, self.reference_nbytes = base, codec, reference_nbytes
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def simulated(self) -> bool:
        return self.codec.simulated or bool(getattr(self.base, "simulated", False))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.codec.apply(x)

    def dequantized_weight(self) -> torch.Tensor:
        w = dense_weight(self.base)
        return (w.float() + self.codec.decode().float()).to(w.dtype)

    def weight_nbytes(self) -> int:
        return weight_nbytes(self.base) + self.codec.nbytes()


def delta_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the deltas as stored, bytes of the same deltas uncompressed) over the model's DeltaLinears."""
    layers = [m for m in model.modules() if isinstance(m, DeltaLinear)]
    return sum(m.codec.nbytes() for m in layers), sum(m.reference_nbytes for m in layers)


def dense_entry(entry: dict[str, Any]) -> torch.Tensor:
    """A checkpoint entry's ΔW [out, in] in float32 (B A scaled for a LoRA entry)."""
    if "delta" in entry:
        return entry["delta"].float()
    return entry["b"].float() @ entry["a"].float() * entry["scale"]


def entry_nbytes(entry: dict[str, Any], dtype: torch.dtype) -> int:
    """The uncompressed delta's bytes in `dtype`: dense ΔW, or both LoRA factors."""
    size = torch.empty(0, dtype=dtype).element_size()
    return size * sum(entry[k].numel() for k in ("delta", "a", "b") if k in entry)


@dataclass
class DeltaTransform(WeightTransform):
    """Base of the delta transforms: finds the cached fine-tune and wraps each tuned linear in a DeltaLinear
    whose codec `codec()` makes. Tuned linears outside `layers` get the delta uncompressed."""

    stage = "compensate"
    modes = ("full", "lora", "lora1bit")  # the fine-tunes this transform can read

    head: bool = field(default=False, init=False)  # the LM head is never tuned, so not a parameter here
    tune: str = param("full", "the cached fine-tune whose delta it applies: full (a few layers' weights), lora, or "
                      "lora1bit (LoRA trained through its 1-bit form)", choices=("full", "lora", "lora1bit"))
    tune_rank: int = param(16, "the LoRA fine-tune's rank (tune=lora or lora1bit)", min=1, max=256)
    tune_layers: str = param("auto", "the fine-tune's layers, as given to `workbench finetune --layers` "
                             "(auto: the last 4 for full, all for the LoRA modes)")

    def codec(self, name: str, entry: dict[str, Any], dtype: torch.dtype) -> DeltaCodec:
        raise NotImplementedError

    def apply(self, model: nn.Module, ctx: CompressionContext) -> None:
        from workbench.training.checkpoints import load_checkpoint
        from workbench.training.finetune import finetune_path, finetune_settings

        if self.tune not in self.modes:
            raise SpecError(f"{self.name}: tune={self.tune} is not supported; valid: {', '.join(self.modes)}")
        settings = finetune_settings(self.tune, self.tune_rank, self.tune_layers, len(model.layers))
        # a tied embedding now read from an earlier transform's compressed head: the key uses the original
        embedding = ctx.original["lm_head"] if isinstance(model.embed, TiedEmbedding) else None
        payload = load_checkpoint(finetune_path(model, settings, embedding))
        if payload is None:
            rank = f" --rank {self.tune_rank}" if self.tune != "full" else ""
            raise SpecError(f"{self.name}: no cached {self.tune} fine-tune of this model (layers "
                            f"{settings['layers']}); make it first with `workbench finetune --mode {self.tune}"
                            f"{rank}" + (f" --layers {self.tune_layers}`" if self.tune_layers != "auto" else "`"))
        chosen = parse_layers(self.layers, len(model.layers))
        sites = {s.name: s for s in linear_sites(model, head=False)}
        for name, entry in payload["deltas"].items():
            site = sites[name]
            entry = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
            codec = self.codec(name, entry, ctx.dtype) if selects(chosen, name) else exact_codec(entry, ctx.dtype)
            self.replace(model, site, DeltaLinear(site.module, codec, entry_nbytes(entry, ctx.dtype)))


def exact_codec(entry: dict[str, Any], dtype: torch.dtype) -> DeltaCodec:
    """The delta as the fine-tune stored it (dense ΔW or LoRA factors), in `dtype`."""
    if "delta" in entry:
        return DenseDelta(entry["delta"].to(dtype))
    return LoraDelta(entry["a"].to(dtype), entry["b"].to(dtype), entry["scale"])


@register("compression", "finetune", lossless=False)
@dataclass
class Finetune(DeltaTransform):
    """The cached fine-tune's delta, uncompressed: the base model turned into the fine-tuned one.

    `workbench finetune` trains it (training/finetune.py: a short fine-tune on a task built from the standard
    library, `full` on a few layers' weights or `lora` adapters) and caches it next to the model; this
    transform adds it to the loaded model's linears as stored (dense ΔW, or the two LoRA factors run as two
    thin products). It is the reference the delta compressors (`dare`, `compeft`, `adapter1bit`) are
    measured against. Not a compression by itself: it adds the delta's bytes."""

    def codec(self, name: str, entry: dict[str, Any], dtype: torch.dtype) -> DeltaCodec:
        return exact_codec(entry, dtype)
