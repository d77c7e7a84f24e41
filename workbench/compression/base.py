"""The weight-transform contract: compressed linear layers, transforms, their context and their application.

A transform (`WeightTransform`, one registered dataclass per file) replaces linear layers of a loaded model
in place by modules with nn.Linear's call (`CompressedLinear`). `apply_compression` runs a spec's
transforms in stage order (`STAGES`; stable within a stage), refuses combinations that cannot work, keeps
a tied embedding tied to a compressed LM head, and reports bytes and time per transform.

Rules every CompressedLinear keeps: all its tensors are buffers or parameters (so `LoadedModel.weight_bytes`
counts them), `weight_nbytes()` is the bytes of its weight alone, and `dequantized_weight()` is the
weight its forward applies. Activation capture for calibrated transforms (GPTQ, EoRA, LLM-FP4) lives in
`compression/calibration.py`; this module gives them `CompressionContext.calibration_ids`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import SpecError
from workbench.kernels import backend_torch
from workbench.models.packed_linear import PackedLinear
from workbench.registry import param

if TYPE_CHECKING:
    from workbench.models import LoadedModel
    from workbench.models.llama import LlamaModel
    from workbench.spec import TechniqueSpec

STAGES = ("slice", "quantize", "prune", "encode", "compensate")  # slice: structured pruning that shrinks layers


class CompressedLinear(nn.Module):
    """Base of compressed linear layers: `forward(x)` as nn.Linear, with `in_features`, `out_features`, `bias`.

    `simulated` is True when no kernel runs the format: forward dequantizes the weight and runs a dense
    matmul, so its speed says nothing about what the format could reach (shown as simulated speed).
    `capturable` is False when forward cannot be recorded in a CUDA graph (a host sync, a copy from the CPU, a
    shape that depends on the data): a run over such a layer takes eager steps (models/static_step.py).
    `int8_activations` (the `act=int8` option of int8 and int4): the layer multiplies its inputs rounded to
    int8 per block of 32 (`backend_torch.quantize_activations`); the reference path rounds them the same way."""

    simulated: ClassVar[bool] = False
    capturable: ClassVar[bool] = True
    int8_activations: bool = False
    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def dequantized_weight(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype, as the forward applies it."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then a dense product: the reference path (and the whole path of formats with no kernel)."""
        if self.int8_activations:
            x = backend_torch.quantize_activations(x).to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def weight_nbytes(self) -> int:
        """Bytes really held for the weight (codes, scales, zeros, bitmaps...), not the bias."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] of the dequantized weight -> [T, in]: the lookup of an embedding tied to this layer.
        Formats that can decode single rows override this; the default dequantizes the whole weight."""
        return self.dequantized_weight()[ids]


class TiedEmbedding(nn.Module):
    """Token embedding of a tied model whose LM head was compressed: looks rows up in the head's compressed
    form, so the shared matrix is stored once. The head is not a submodule here (the model holds it)."""

    def __init__(self, head: CompressedLinear, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.tie(head)
        # An empty stand-in: LlamaModel reads its dtype and device from `embed.weight`.
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def tie(self, head: CompressedLinear) -> None:
        object.__setattr__(self, "head", head)  # a plain reference, not a second registration

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.rows(ids)


@dataclass
class LinearSite:
    """One linear layer of the model: `name` ("layers.3.qkv", "lm_head"), where it hangs, and the module."""

    name: str
    parent: nn.Module
    attr: str
    module: nn.Module


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, PackedLinear, CompressedLinear))


def linear_sites(model: LlamaModel, head: bool) -> list[LinearSite]:
    """Every linear layer of the decoder layers in order (qkv, o, gate_up, down), then the LM head if `head`."""
    sites = [LinearSite(f"layers.{i}.{attr}", layer, attr, child)
             for i, layer in enumerate(model.layers) for attr, child in layer.named_children() if is_linear(child)]
    if head:
        sites.append(LinearSite("lm_head", model, "lm_head", model.lm_head))
    return sites


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight [out, in] a linear layer applies, dense, in its compute dtype (a view for nn.Linear)."""
    if isinstance(module, CompressedLinear):
        return module.dequantized_weight()
    if isinstance(module, (nn.Linear, PackedLinear)):
        return module.weight.detach()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def weight_nbytes(module: nn.Module) -> int:
    """Bytes held for a linear layer's weight (not its bias)."""
    if isinstance(module, CompressedLinear):
        return module.weight_nbytes()
    if isinstance(module, PackedLinear):
        return module.packed_nbytes()
    if isinstance(module, nn.Linear):
        return module.weight.numel() * module.weight.element_size()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def check_group(technique: str, site: LinearSite, group: int) -> None:
    """Raise SpecError unless `group` divides the layer's in_features; the message lists groups that fit."""
    n = site.module.in_features
    if n % group:
        valid = [g for g in (16, 32, 64, 128, 256) if n % g == 0]
        raise SpecError(f"{technique}: group={group} does not divide {site.name}'s {n} inputs (weight "
                        f"[{site.module.out_features}, {n}]); valid groups here: {', '.join(map(str, valid))}")


ACTIVATIONS = ("float", "int8")  # the `act` choices of the int8 and int4 transforms
ACT_HELP = ("activations the layers multiply: 'float' (the model's dtype, exact) or 'int8' (rounded to int8 per "
            "block of 32 inputs, integer dot products as llama.cpp's CPU path: faster, lossy; inputs a multiple of 32)")


def check_int8_activations(technique: str, sites: list[LinearSite]) -> None:
    """Raise SpecError unless every layer's inputs come in whole blocks of 32 (act=int8)."""
    for site in sites:
        n = site.module.in_features
        if n % backend_torch.A8_BLOCK:
            raise SpecError(f"{technique}: act=int8 rounds inputs in blocks of {backend_torch.A8_BLOCK}, but "
                            f"{site.name} has {n} inputs; use act=float")


@dataclass
class CompressionContext:
    """What transforms may need beyond the model: its tokenizer (None for random models), dtype and device,
    and the dense weights before any transform ran (`original`, site name -> [out, in])."""

    tokenizer: object | None
    dtype: torch.dtype
    device: torch.device
    vocab_size: int = 0
    original: dict[str, torch.Tensor] = field(default_factory=dict)
    _calibration: torch.Tensor | None = field(default=None, repr=False)

    def original_weight(self, name: str, module: nn.Module) -> torch.Tensor:
        """The site's weight before any transform; recorded now (from `module`) if it was not yet."""
        if name not in self.original:
            self.original[name] = dense_weight(module).clone()
        return self.original[name]

    def calibration_ids(self, n_tokens: int) -> torch.Tensor:
        """The first `n_tokens` tokens [n] of the standard-library calibration text (`workbench.text`), on the
        model's device; a model without a tokenizer gets seeded random ids instead."""
        if self.tokenizer is None:
            g = torch.Generator().manual_seed(0)
            return torch.randint(0, self.vocab_size, (n_tokens,), generator=g).to(self.device)
        if self._calibration is None:
            from workbench.text import calibration_text

            self._calibration = torch.tensor(self.tokenizer(calibration_text())["input_ids"], dtype=torch.long)
        if n_tokens > len(self._calibration):
            raise SpecError(f"asked for {n_tokens} calibration tokens; the calibration text has "
                            f"{len(self._calibration)}")
        return self._calibration[:n_tokens].to(self.device)


def parse_layers(text: str, n_layers: int) -> set[tuple[int, str | None]] | None:
    """The decoder-layer sites a `layers` selector names: None for "all", else a set of (layer, attr) with
    attr None for every linear of that layer. Syntax: items joined by `/`, each `I`, `I-J` (inclusive) or
    either followed by `.attr` (qkv, o, gate_up, down): `0-3/7.down/12.qkv`."""
    if text == "all":
        return None
    chosen: set[tuple[int, str | None]] = set()
    for item in filter(None, text.split("/")):
        span, _, attr = item.partition(".")
        lo, dash, hi = span.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise SpecError(f"layers={text!r}: {item!r} is not a layer index or range; expected e.g. "
                            "'all', '0-3', '0-3/7.down' (items joined by '/')") from None
        if not 0 <= first <= last < n_layers:
            raise SpecError(f"layers={text!r}: {span!r} is outside this model's decoder layers 0-{n_layers - 1}")
        chosen |= {(i, attr or None) for i in range(first, last + 1)}
    return chosen


def selects(chosen: set[tuple[int, str | None]] | None, site_name: str) -> bool:
    """Whether a site ("layers.3.qkv") is in a parsed `layers` selector (the LM head is governed by `head`)."""
    if chosen is None or not site_name.startswith("layers."):
        return True
    _, index, attr = site_name.split(".", 2)
    return (int(index), None) in chosen or (int(index), attr) in chosen


@dataclass
class WeightTransform:
    """Base of every registered compression technique: `apply` replaces linear layers of `model` in place.

    Class attributes: `stage` (one of STAGES); `needs_dense`: the transform reads plain dense weights
    (nn.Linear), so it cannot follow a transform that replaced them; `uses_original`: it reads
    `ctx.original_weight` after earlier transforms ran (so the originals are recorded before any runs);
    `reshapes`: it changes layers' shapes (structured pruning), so nothing that compares with the original
    weights may follow it on those layers.

    `layers` restricts a transform to some decoder layers' linears (the per-layer plans of `workbench search`
    are chains of one quantizer per level, each on its own layers: `int4:bits=2,layers=0-3+int4:bits=3,...`)."""

    stage: ClassVar[str] = "quantize"
    needs_dense: ClassVar[bool] = False
    uses_original: ClassVar[bool] = False
    reshapes: ClassVar[bool] = False
    head: bool = param(False, "also compress the LM head / tied embedding")
    layers: str = param("all", "decoder layers whose linears it compresses: all, or items joined by / such as "
                        "0-3, 7 or 7.down (attrs qkv, o, gate_up, down)")

    def sites(self, model: LlamaModel) -> list[LinearSite]:
        """The linear layers this transform compresses: `layers` of the decoder, then the LM head if `head`."""
        chosen = parse_layers(self.layers, len(model.layers))
        return [s for s in linear_sites(model, self.head) if selects(chosen, s.name)]

    def apply(self, model: LlamaModel, ctx: CompressionContext) -> None:
        raise NotImplementedError

    def keeps_dense(self) -> bool:
        """Whether the layers it leaves are still plain nn.Linear (a later `needs_dense` transform can follow)."""
        return False

    def replace(self, model: LlamaModel, site: LinearSite, module: nn.Module) -> None:
        """Put `module` where `site` was (a compressed LM head keeps a tied embedding tied: `retie`)."""
        setattr(site.parent, site.attr, module)
        retie(model)

    @property
    def name(self) -> str:
        return getattr(self, "technique_name", type(self).__name__)


def retie(model: LlamaModel) -> None:
    """A tied model whose LM head is no longer a plain linear reads its embedding from the head's form."""
    if not model.config.tie_word_embeddings:
        return
    head = model.lm_head
    if isinstance(model.embed, TiedEmbedding):
        model.embed.tie(head)
    elif isinstance(head, CompressedLinear):
        model.embed = TiedEmbedding(head, model.dtype, model.device)


@dataclass
class TransformReport:
    name: str  # the transform's spec string, e.g. "int4:group=32"
    stage: str
    bytes_before: int  # weight bytes of the whole model, before and after this transform
    bytes_after: int
    seconds: float
    layers: int  # linear layers this transform replaced
    simulated: bool  # some layer it made has no kernel (dequantize-then-matmul speed)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, shared tensors once, plus oneDNN-packed weights."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) + sum(
        m.packed_nbytes() for m in model.modules() if isinstance(m, PackedLinear))


def _identity(module: nn.Module) -> tuple[int, int]:
    """A layer changes when it is replaced, or when its dense weight is (pruning with dense storage)."""
    return id(module), id(module._parameters.get("weight"))


def check_combination(transforms: list[WeightTransform], model: LlamaModel) -> None:
    """Refuse chains that cannot work (SpecError naming both transforms); `transforms` in stage order.
    Two quantizers may share a chain when their sites are disjoint (a per-layer plan)."""
    names = [{s.name for s in t.sites(model)} for t in transforms]
    for i, t in enumerate(transforms):
        for j, earlier in enumerate(transforms[:i]):
            if t.stage == "quantize" and earlier.stage == "quantize" and names[i] & names[j]:
                raise SpecError(f"{earlier.name} and {t.name} are both quantizers of the same layers; a layer is "
                                "quantized once, so use one of them or give them disjoint `layers`")
            if earlier.reshapes and (t.uses_original or t.stage == "compensate") and names[i] & names[j]:
                raise SpecError(f"{t.name} ({t.stage}) compares with the original weights, but {earlier.name} "
                                "changed their shapes first; use one or the other, or give them disjoint `layers`")
            if t.needs_dense and not earlier.keeps_dense() and names[i] & names[j]:
                raise SpecError(f"{t.name} ({t.stage}) needs the dense weights, but {earlier.name} "
                                f"({earlier.stage}, applied first) replaced them; use one or the other")


@torch.no_grad()
def apply_compression(loaded: LoadedModel, specs: list[TechniqueSpec]) -> list[TransformReport]:
    """Build the spec's transforms, order them by stage, check the chain and apply it to `loaded.model`."""
    built = [(spec, spec.build("compression")) for spec in specs]
    for _, t in built:
        if t.stage not in STAGES:
            raise TypeError(f"{t.name}: stage {t.stage!r} is not one of {STAGES}")
    built.sort(key=lambda pair: STAGES.index(pair[1].stage))  # stable within a stage
    transforms = [t for _, t in built]
    model = loaded.model
    check_combination(transforms, model)
    ctx = CompressionContext(loaded.tokenizer, loaded.dtype, loaded.device, loaded.config.vocab_size)
    if any(t.uses_original or t.stage == "compensate" for t in transforms[1:]):
        for site in linear_sites(model, head=True):
            ctx.original_weight(site.name, site.module)
    reports = []
    for spec, t in built:
        before_modules = {_identity(s.module) for s in linear_sites(model, head=True)}
        before, start = model_weight_bytes(model), time.perf_counter()
        t.apply(model, ctx)
        retie(model)
        seconds = time.perf_counter() - start
        made = [s.module for s in linear_sites(model, head=True) if _identity(s.module) not in before_modules]
        reports.append(TransformReport(spec.to_string(), t.stage, before, model_weight_bytes(model), seconds,
                                       len(made), any(getattr(m, "simulated", False) for m in made)))
    return reports
