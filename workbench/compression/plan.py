"""Per-layer compression plans: a level (bits and group) per decoder linear, written as a chain of transforms.

A level is a bit width (2, 3, 4) at a group size (64 or 32). Its cost is what it really stores per weight:
the code bits plus a bf16 scale and offset per group (32 bits / group), so `LEVELS` runs 2.5, 3.0, ... 5.0
bits per weight in equal steps of half a bit, and a plan's budget counts the scales too (uniform 3-bit at
group 64 costs 3.5). The quantizer of the levels is round-to-nearest (`int4`) or GPTQ (`gptq`, as in
EvoPress's level database). As a spec a plan is one `int4:bits=B,group=G,layers=...` (or `gptq:...`) per
level used, each on its own layers (the shared `layers` selector of compression/base.py), so it is an
ordinary `compress` string: runnable inline or from a file with `--compress plan:FILE` (the file holds the
RunSpec string `compress=...` that `workbench search` writes). The LM head stays as it is (bf16) in plans
and in the uniform baselines alike.

The searches (`hawq`, `evopress`) share `LevelTable`: every site's weight at every level, made once (GPTQ's
by one sequential GPTQ pass of the whole model per level, as uniform `gptq` quantizes, so that each level's
layers are compensated for the quantized layers before them and uniform GPTQ is a point of the search space),
and a way to put a plan's weights into the model as plain linears holding exactly the dequantized weights (the
same products the plan's layers compute, at dense speed) to score it on calibration text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from workbench.compression.base import LinearSite, dense_weight, linear_sites
from workbench.compression.calibration import layerwise
from workbench.compression.gptq import gptq_quantize
from workbench.compression.int4 import quantize_rtn_int4
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

SCALE_BITS = 32  # a bf16 scale and offset per group
QUANTIZERS = {"rtn": "int4", "gptq": "gptq"}  # the levels' quantizer -> the transform that runs it in a plan


class Level(NamedTuple):
    bits: int
    group: int

    @property
    def cost(self) -> float:
        """Bits stored per weight: the code plus the group's scale and offset."""
        return self.bits + SCALE_BITS / self.group


LEVELS = tuple(sorted((Level(b, g) for b in (2, 3, 4) for g in (64, 32)), key=lambda lv: lv.cost))
LEVEL_STEP = 0.5  # bits per weight between consecutive levels (EvoPress's level switch keeps the size)
PLAN_PREFIX = "plan:"


def level_index(bits: float, group: int) -> float:
    """The position on the level scale of `bits` at `group` (a budget's cost; fractional between levels)."""
    return (bits + SCALE_BITS / group - LEVELS[0].cost) / LEVEL_STEP


def by_layer(names: list[str]) -> dict[int, list[str]]:
    """Site names ("layers.3.down") grouped by decoder layer: index -> attrs."""
    per_layer: dict[int, list[str]] = {}
    for name in names:
        _, index, attr = name.split(".", 2)
        per_layer.setdefault(int(index), []).append(attr)
    return per_layer


def layers_selector(names: list[str], attrs: list[str]) -> str:
    """A transform's `layers` value for these site names: layers with every one of `attrs` as ranges
    (consecutive ones joined, "3-5"), the others' linears as i.attr, joined by '/'."""
    per_layer = by_layer(names)
    whole = [i for i, a in sorted(per_layer.items()) if sorted(a) == sorted(attrs)]
    items, start = [], None
    for k, i in enumerate(whole):  # consecutive whole layers as ranges
        start = i if start is None else start
        if k + 1 == len(whole) or whole[k + 1] != i + 1:
            items.append(str(i) if start == i else f"{start}-{i}")
            start = None
    items += [f"{i}.{a}" for i, a_list in sorted(per_layer.items()) if i not in whole for a in a_list]
    return "/".join(items)


def plan_specs(levels: dict[str, int], attrs: list[str], quantizer: str = "rtn") -> list[TechniqueSpec]:
    """The compress chain of a plan (levels: indices into LEVELS): one transform per level used, ordered by
    cost; its `layers` names whole layers (all `attrs` at that level) as ranges, the others as i.attr."""
    specs = []
    for level in sorted(set(levels.values())):
        layers = layers_selector([n for n, b in levels.items() if b == level], attrs)
        bits, group = LEVELS[level]
        specs.append(TechniqueSpec(QUANTIZERS[quantizer], {"bits": bits, "group": group, "layers": layers}))
    return specs


def plan_string(levels: dict[str, int], attrs: list[str], quantizer: str = "rtn") -> str:
    """The RunSpec string of a plan: `compress=int4:bits=2,group=64,...+int4:bits=3,...`."""
    return RunSpec(compress=plan_specs(levels, attrs, quantizer)).to_string()


def expand_plan_files(items: list[str]) -> list[str]:
    """`plan:FILE` items of a --compress list replaced by the chain the file holds (a RunSpec string with a
    `compress` field, as `workbench search` writes); other items unchanged."""
    out = []
    for item in items:
        if not item.strip().startswith(PLAN_PREFIX):
            out.append(item)
            continue
        path = Path(item.strip()[len(PLAN_PREFIX):]).expanduser()
        if not path.is_file():
            raise SpecError(f"plan file {str(path)!r} does not exist; expected plan:FILE with FILE written by "
                            "`workbench search -o FILE`")
        spec = RunSpec.parse(path.read_text().strip())
        if not spec.compress:
            raise SpecError(f"plan file {str(path)!r} has no compress=... field; expected a `workbench search` plan")
        out.append("+".join(t.to_string() for t in spec.compress))
    return out


def average_bits(levels: dict[str, int], sizes: dict[str, int]) -> float:
    """Bits stored per weight by the plan (codes, scales and offsets), weighted by each linear's weight count."""
    return sum(LEVELS[levels[n]].cost * sizes[n] for n in levels) / sum(sizes[n] for n in levels)


def _dequantized(w: torch.Tensor, group: int, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
                 ) -> torch.Tensor:
    """codes [out, in], scales and offsets [out, in / group] -> the weight they store, [out, in] in w's dtype."""
    w_hat = codes.float().view(*scales.shape, group) * scales[..., None] + offsets[..., None]
    return w_hat.view_as(w).to(w.dtype)


@torch.no_grad()
def _gptq_pass(model: nn.Module, sites: list[LinearSite], ids: torch.Tensor, level: Level) -> dict[str, torch.Tensor]:
    """Every site's weight after uniform GPTQ at `level`, quantized in GPTQ's sequential pass (each layer's
    Hessian from the inputs the already-quantized layers before it give); the model is left as it was."""
    originals = {site.name: site.module.weight.data for site in sites}
    out = {}

    def quantize(layer_sites: list[LinearSite], hessians: dict[str, torch.Tensor]) -> None:
        for site in layer_sites:  # this level's weights feed the later layers' Hessians
            w = dense_weight(site.module)
            quantized = gptq_quantize(w, hessians[site.name], level.bits, level.group, act_order=True,
                                      param_dtype=w.dtype)
            site.module.weight.data = out[site.name] = _dequantized(w, level.group, *quantized)

    try:
        layerwise(model, sites, ids, quantize)
    finally:
        for site in sites:
            site.module.weight.data = originals[site.name]
    return out


@dataclass
class LevelTable:
    """Every decoder linear's dequantized weight at every level (`quantizer` rtn or gptq), for scoring plans."""

    sites: list[LinearSite]
    weights: dict[str, dict[int, torch.Tensor]]  # site name -> level index -> [out, in] in the model's dtype
    sizes: dict[str, int]  # weights per site
    quantizer: str = "rtn"

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, quantizer: str = "rtn", ids: torch.Tensor | None = None,
              progress: bool = False) -> LevelTable:
        """`ids`: the calibration tokens GPTQ's sequential passes run on (needed for gptq)."""
        from tqdm.auto import tqdm

        sites = linear_sites(model, head=False)
        for site in sites:
            for group in sorted({lv.group for lv in LEVELS}):
                if site.module.in_features % group:
                    raise SpecError(f"search: group={group} does not divide {site.name}'s "
                                    f"{site.module.in_features} inputs")
        weights = {site.name: {} for site in sites}
        sizes = {site.name: site.module.weight.numel() for site in sites}
        if quantizer == "gptq":
            if ids is None:
                raise SpecError("search: GPTQ levels need calibration token ids (LevelTable.build's ids)")
            for k, level in enumerate(tqdm(LEVELS, desc="levels (gptq, a sequential pass each)",
                                           disable=not progress)):
                for name, w_hat in _gptq_pass(model, sites, ids, level).items():
                    weights[name][k] = w_hat
        else:
            for site in tqdm(sites, desc="levels (rtn)", disable=not progress):
                w = dense_weight(site.module)
                for k, (bits, group) in enumerate(LEVELS):
                    weights[site.name][k] = _dequantized(w, group, *quantize_rtn_int4(w, group, w.dtype, bits))
        return cls(sites, weights, sizes, quantizer)

    @property
    def attrs(self) -> list[str]:
        return sorted({s.name.split(".", 2)[2] for s in self.sites})

    def error(self, name: str, level: int, original: torch.Tensor) -> float:
        """‖Q(W) − W‖² of one site at a level."""
        return float((self.weights[name][level].float() - original.float()).pow(2).sum())

    def install(self, levels: dict[str, int]) -> None:
        """Point every site's linear at its level's weight (the model must hold nn.Linear at each site)."""
        for site in self.sites:
            site.module.weight.data = self.weights[site.name][levels[site.name]]


@torch.no_grad()
def reference_logprobs(model: nn.Module, segments: list[torch.Tensor]) -> list[torch.Tensor]:
    """Next-token log-probabilities [len, vocab] of the model as it is, per calibration segment."""
    return [torch.log_softmax(model(s, torch.arange(len(s))).logits.float(), -1) for s in segments]


@torch.no_grad()
def calibration_kl(model: nn.Module, segments: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Mean KL(reference || model) per token over the segments: EvoPress's fitness (lower is better)."""
    total, n = 0.0, 0
    for seg, ref in zip(segments, reference):
        logp = torch.log_softmax(model(seg, torch.arange(len(seg))).logits.float(), -1)
        total += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
        n += len(seg)
    return total / n
