"""FLIQS: a per-layer search over integer and floating-point formats under a size budget, by a policy trained
with REINFORCE on a cost-penalised reward.

Paper: "FLIQS: One-Shot Mixed-Precision Floating-Point and Integer Quantization Search", Dong et al.,
arXiv 2308.03290.

Every decoder linear chooses one format from a menu of registered quantizers (default: round-to-nearest
integer at 2, 3, 4 bits with group 64 and 3 bits at group 32, FP4 E2M1 with a float16 absmax scale per 64 inputs,
MXFP4, MXFP6 E2M3 and per-channel int8), each format's weights made once by running its transform on a copy
of the model. The controller is a categorical distribution per linear (logits θ[site, format], uniform at
the start). Each step samples a plan from it, installs the plan's dequantized weights and measures the
reward R = −KL(uncompressed ‖ plan) on one calibration segment (in turn) − γ·|C/C_T − 1|, C the plan's real
bits stored per weight and C_T the budget: the paper's absolute cost penalty (from TuNAS), which pushes the
plan onto the budget rather than under it. θ is moved by REINFORCE, ∇ log π(plan)·(R − b), b a moving
average of R, with Adam. The result is each linear's most likely format; if it is over the budget, linears
are moved to cheaper formats in the order that costs the policy least log-probability per byte saved.
Left out: the paper's one-shot training of the shared weights with quantization-aware training while the
controller learns (here the weights are frozen and each format post-training), its warm-up phase, and its
activation formats and architecture search.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.compression.base import apply_compression, dense_weight, linear_sites, weight_nbytes
from workbench.compression.plan import calibration_kl, layers_selector, reference_logprobs
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

FORMATS = ("int4:bits=2,group=64", "int4:bits=3,group=64", "int4:bits=3,group=32", "int4:bits=4,group=64",
           "fp4:format=e2m1,group=64,calibrate=false,steps=1", "mx:format=fp4", "mx:format=fp6_e2m3",
           "int8:head=false")


@dataclasses.dataclass
class FormatTable:
    """Every decoder linear's dequantized weight [out, in] and real bytes under every format of the menu."""

    formats: list[str]
    names: list[str]  # site names, in model order
    weights: dict[str, list[torch.Tensor]]  # site -> format index -> weight in the model's dtype
    nbytes: dict[str, list[int]]  # site -> format index -> bytes stored for the weight
    sizes: dict[str, int]  # weights per site

    @classmethod
    @torch.no_grad()
    def build(cls, loaded, formats: list[str], progress: bool = True) -> FormatTable:
        names = [s.name for s in linear_sites(loaded.model, head=False)]
        weights: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        nbytes: dict[str, list[int]] = {n: [] for n in names}
        for text in tqdm(formats, desc="fliqs: formats", disable=not progress):
            spec = TechniqueSpec.parse(text)
            if "layers" in spec.params or spec.params.get("head") in (True, "true"):
                raise SpecError(f"fliqs: format {text!r} may not set layers or head; the search assigns layers")
            trial = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model), compression=[])
            apply_compression(trial, [spec])
            for site in linear_sites(trial.model, head=False):
                weights[site.name].append(dense_weight(site.module).to(loaded.dtype).clone())
                nbytes[site.name].append(weight_nbytes(site.module))
            del trial
        sizes = {s.name: dense_weight(s.module).numel() for s in linear_sites(loaded.model, head=False)}
        return cls(list(formats), names, weights, nbytes, sizes)

    def bits(self, plan: list[int]) -> float:
        """Bits stored per weight by a plan (format index per site), over all decoder linears."""
        total = sum(self.nbytes[n][k] for n, k in zip(self.names, plan))
        return 8 * total / sum(self.sizes.values())

    def install(self, sites: list, plan: list[int]) -> None:
        for site, k in zip(sites, plan):
            site.module.weight.data = self.weights[site.name][k]


def repair(table: FormatTable, logits: torch.Tensor, plan: list[int], budget: float) -> list[int]:
    """Move linears to cheaper formats until the plan fits `budget` bits per weight, each move the one that
    loses the policy the least log-probability per byte saved."""
    plan = list(plan)
    logp = torch.log_softmax(logits, -1)
    while table.bits(plan) > budget + 1e-9:
        best = None
        for i, n in enumerate(table.names):
            for k, b in enumerate(table.nbytes[n]):
                saved = table.nbytes[n][plan[i]] - b
                if saved > 0:
                    loss = float(logp[i, plan[i]] - logp[i, k]) / saved
                    if best is None or loss < best[0]:
                        best = (loss, i, k)
        if best is None:
            raise SpecError(f"fliqs: no plan of these formats fits {budget:.3f} bits per weight; the cheapest "
                            f"stores {table.bits(plan):.3f}: raise the budget or add a cheaper format")
        plan[best[1]] = best[2]
    return plan


def fliqs_plan(model: nn.Module, table: FormatTable, segments: list[torch.Tensor], budget: float, steps: int,
               cost_weight: float, lr: float, seed: int, deadline: float, progress: bool = True
               ) -> tuple[list[int], dict]:
    """Train the controller for up to `steps` samples (or until `deadline`) and return its plan (format index
    per site, within `budget` bits per weight) and a record (rewards, costs, KL, steps)."""
    sites = [s for s in linear_sites(model, head=False)]
    dense = {s.name: s.module.weight.data for s in sites}
    reference = reference_logprobs(model, segments)
    logits = torch.zeros(len(sites), len(table.formats), requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    g = torch.Generator().manual_seed(seed)
    baseline, rewards, costs, kls = None, [], [], []
    try:
        bar = tqdm(range(steps), desc="fliqs: controller samples", disable=not progress)
        for step in bar:
            if time.monotonic() > deadline:
                break
            with torch.no_grad():
                plan = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
            table.install(sites, plan.tolist())
            k = step % len(segments)
            kl = calibration_kl(model, segments[k:k + 1], reference[k:k + 1])
            cost = table.bits(plan.tolist())
            reward = -kl - cost_weight * abs(cost / budget - 1)  # FLIQS/TuNAS: R = Q + γ|C/C_T − 1|, γ < 0
            baseline = reward if baseline is None else 0.9 * baseline + 0.1 * reward
            with torch.enable_grad():
                log_prob = torch.log_softmax(logits, -1).gather(1, plan[:, None]).sum()
                loss = -(reward - baseline) * log_prob
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            rewards.append(reward)
            costs.append(cost)
            kls.append(kl)
            bar.set_postfix(kl=f"{kl:.3f}", bits=f"{cost:.2f}")
    finally:
        for site in sites:  # leave the model as it came
            site.module.weight.data = dense[site.name]
    final = logits.detach()
    plan = repair(table, final, final.argmax(-1).tolist(), budget)
    return plan, {"steps": len(rewards), "reward": rewards, "bits": costs, "kl": kls}


def plan_specs(table: FormatTable, plan: list[int]) -> list[TechniqueSpec]:
    """One transform per format used, on the layers that chose it (whole layers as ranges, others as i.attr)."""
    attrs = sorted({n.split(".", 2)[2] for n in table.names})
    specs = []
    for k in sorted(set(plan), key=lambda k: table.formats[k]):
        layers = layers_selector([n for n, f in zip(table.names, plan) if f == k], attrs)
        spec = TechniqueSpec.parse(table.formats[k])
        specs.append(TechniqueSpec(spec.name, {**spec.params, "layers": layers}))
    return specs


def fliqs_search(model_name: str, budget: float, minutes: float, seed: int = 0, tokens: int = 1024,
                 device: str = "auto", progress: bool = True, formats: tuple[str, ...] | None = None,
                 steps: int = 100_000, cost_weight: float = 10.0, lr: float = 0.05):
    """A FLIQS plan of `formats` at `budget` bits stored per weight (codes and scales) within `minutes` (the
    format table is built before the clock starts; `seconds` counts it), as a search.SearchResult whose
    levels are format indices into details["formats"]."""
    from workbench.compression.base import CompressionContext
    from workbench.compression.calibration import segments as split_segments
    from workbench.compression.search import SearchResult
    from workbench.models import load_model

    if not math.isfinite(budget) or budget <= 0:
        raise SpecError(f"fliqs: the budget must be a positive number of bits per weight; got {budget}")
    start = time.monotonic()
    torch.manual_seed(seed)
    loaded = load_model(model_name, "auto", device)
    ctx = CompressionContext(loaded.tokenizer, loaded.dtype, loaded.device, loaded.config.vocab_size)
    segs = split_segments(ctx.calibration_ids(tokens), 256)
    table = FormatTable.build(loaded, list(formats or FORMATS), progress)
    deadline = time.monotonic() + 60 * minutes
    plan, record = fliqs_plan(loaded.model, table, segs, budget, steps, cost_weight, lr, seed, deadline, progress)
    counts = {f: plan.count(k) for k, f in enumerate(table.formats) if k in plan}
    details = {"formats": table.formats, "linears_per_format": counts, "budget_bits_stored": budget, **record}
    return SearchResult("fliqs", RunSpec(compress=plan_specs(table, plan)).to_string(),
                        dict(zip(table.names, plan)), table.bits(plan), time.monotonic() - start, details)
