"""Per-layer compression plans: a bit width per decoder linear, written as a chain of `int4` transforms.

A plan maps every decoder linear ("layers.3.down") to a level (bits 2, 3 or 4 of round-to-nearest `int4`).
As a spec it is one `int4:bits=B,group=G,layers=...` per level used, each on its own layers (the shared
`layers` selector of compression/base.py), so a plan is an ordinary `compress` string: runnable inline or
from a file with `--compress plan:FILE` (the file holds the RunSpec string `compress=...` that
`workbench search` writes). The LM head stays as it is (bf16) in plans and in the uniform baselines alike.

The searches (`hawq`, `evopress`) share `LevelTable`: every site's weight at every level, made once, and a
way to put a plan's weights into the model as plain linears holding exactly the dequantized weights (the
same products the plan's layers compute, at dense speed) to score it on calibration text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workbench.compression.base import LinearSite, dense_weight, linear_sites
from workbench.compression.int4 import quantize_rtn_int4
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

LEVELS = (2, 3, 4)  # bits per weight a plan may give a linear
PLAN_PREFIX = "plan:"


def by_layer(names: list[str]) -> dict[int, list[str]]:
    """Site names ("layers.3.down") grouped by decoder layer: index -> attrs."""
    per_layer: dict[int, list[str]] = {}
    for name in names:
        _, index, attr = name.split(".", 2)
        per_layer.setdefault(int(index), []).append(attr)
    return per_layer


def plan_specs(levels: dict[str, int], attrs: list[str], group: int) -> list[TechniqueSpec]:
    """The compress chain of a plan: one int4 transform per bit width used, ordered by bits; its `layers`
    names whole layers (all `attrs` at that width) as ranges, the others as i.attr."""
    specs = []
    for bits in sorted(set(levels.values())):
        per_layer = by_layer([n for n, b in levels.items() if b == bits])
        items, whole = [], [i for i, a in sorted(per_layer.items()) if sorted(a) == sorted(attrs)]
        start = None
        for k, i in enumerate(whole):  # consecutive whole layers as ranges
            start = i if start is None else start
            if k + 1 == len(whole) or whole[k + 1] != i + 1:
                items.append(str(i) if start == i else f"{start}-{i}")
                start = None
        items += [f"{i}.{a}" for i, a_list in sorted(per_layer.items()) if i not in whole for a in a_list]
        specs.append(TechniqueSpec("int4", {"bits": bits, "group": group, "layers": "/".join(items)}))
    return specs


def plan_string(levels: dict[str, int], attrs: list[str], group: int) -> str:
    """The RunSpec string of a plan: `compress=int4:bits=2,...+int4:bits=3,...`."""
    return RunSpec(compress=plan_specs(levels, attrs, group)).to_string()


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
    """Bits per weight of the plan's codes, weighted by each linear's weight count."""
    return sum(levels[n] * sizes[n] for n in levels) / sum(sizes[n] for n in levels)


@dataclass
class LevelTable:
    """Every decoder linear's dequantized weight at every level (round-to-nearest, `group`), for scoring plans."""

    sites: list[LinearSite]
    weights: dict[str, dict[int, torch.Tensor]]  # site name -> bits -> [out, in] in the model's dtype
    sizes: dict[str, int]  # weights per site
    group: int

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, group: int) -> LevelTable:
        sites = linear_sites(model, head=False)
        weights, sizes = {}, {}
        for site in sites:
            w = dense_weight(site.module)
            if w.shape[1] % group:
                raise SpecError(f"search: group={group} does not divide {site.name}'s {w.shape[1]} inputs")
            weights[site.name] = {}
            for bits in LEVELS:
                codes, scales, offsets = quantize_rtn_int4(w, group, w.dtype, bits)
                w_hat = codes.float().view(*scales.shape, group) * scales[..., None] + offsets[..., None]
                weights[site.name][bits] = w_hat.view_as(w).to(w.dtype)
            sizes[site.name] = w.numel()
        return cls(sites, weights, sizes, group)

    @property
    def attrs(self) -> list[str]:
        return sorted({s.name.split(".", 2)[2] for s in self.sites})

    def error(self, name: str, bits: int, original: torch.Tensor) -> float:
        """‖Q_bits(W) − W‖² of one site."""
        return float((self.weights[name][bits].float() - original.float()).pow(2).sum())

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
