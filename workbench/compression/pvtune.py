"""PV-Tuning: fine-tuning a 2- or 3-bit model's codes and scales, the codes by a subspace linearized V step
chosen from the gradient instead of the straight-through estimator.

Paper: "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression", Malinovskii et al.,
arXiv 2405.14852.

The quantized weights are W = s ⊙ Q + z: integer codes Q and a scale s and offset z per group (the
`LowBitLinear` layers that `decoupleq`, `gptq:bits=2|3` and `int4:bits=2|3` leave). The objective is the KL
divergence of the quantized model's next-token distributions from the uncompressed model's on calibration
text (one segment per step, in turn). PV-Tuning alternates two steps on it, each on a fresh gradient:
- P step (continuous parameters, codes fixed): Adam on every (s, z), `p_steps` of them per round.
- V step (discrete codes, (s, z) fixed): the loss's gradient with respect to each code, ∂L/∂Q = s ⊙ ∂L/∂W,
  gives a linearized step in code space, Q' = Q − clamp(round(η ∂L/∂Q / rms(∂L/∂Q)), −1, 1) within the code
  range (the linearized V step: a gradient step projected onto the integer grid, at most one level, as the
  linearization holds only near Q). Of the codes that step would change, only the `tau` fraction of each
  layer's weights with the largest predicted loss decrease ∂L/∂Q · (Q − Q') change (the paper's subspace V
  step: a small set chosen from the gradient, where the straight-through estimator would round every
  weight's update).
A V step that raises the loss of the segment it was computed on is undone (a safeguard of this CPU-sized
version: with one segment per step, a step of `tau` = 0.3% of the codes once raised the KL from 0.14 to 8.1 on
SmolLM2). The result is the same `LowBitLinear` format (same bits, group and bytes). Left out: the paper's vector
(AQLM/QuIP#) codebooks (here scalar uniform codes), its Adam statistics in the V step (here the gradient is
scaled by its root mean square per layer), tuning the norms and the embedding, and its hours of GPU
training (here `steps` rounds on CPU, the model in float32 while it tunes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.compression.base import CompressionContext, LinearSite, WeightTransform
from workbench.compression.calibration import segments as split_segments
from workbench.compression.formats import unpack_codes
from workbench.compression.int4 import LowBitLinear
from workbench.errors import SpecError
from workbench.registry import param, register


class TunableAffine(nn.Module):
    """A linear layer W = s ⊙ Q + z during tuning: codes Q fixed-point (uint8 buffer), s and z float32
    parameters; `track` keeps the dequantized weight's gradient for the V step."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int, bits: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.uint8))
        self.scales = nn.Parameter(scales.float().clone())
        self.offsets = nn.Parameter(offsets.float().clone())
        self.group, self.bits, self.bias = group, bits, bias
        self.out_features, self.in_features = codes.shape
        self.track, self.w = False, None

    @classmethod
    def of(cls, layer: LowBitLinear) -> TunableAffine:
        codes = unpack_codes(layer.packed, layer.bits, layer.in_features)
        return cls(codes, layer.scales, layer.offsets, layer.group, layer.bits, layer.bias)

    def weight(self) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        q = self.codes.float().view(out_f, -1, self.group)
        return (q * self.scales[..., None] + self.offsets[..., None]).view(out_f, in_f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        if self.track:
            w.retain_grad()
            self.w = w
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def v_step(self, eta: float, tau: float) -> int:
        """The subspace linearized V step on this layer's codes (module docstring); returns codes changed."""
        grad_w = self.w.grad
        self.w = None
        out_f, in_f = self.codes.shape
        grad_q = (grad_w.view(out_f, -1, self.group) * self.scales[..., None]).view(out_f, in_f)
        rms = grad_q.pow(2).mean().sqrt()
        if not torch.isfinite(rms) or rms == 0:
            return 0
        q = self.codes.float()
        step = torch.clamp(torch.round(eta * grad_q / rms), -1, 1)  # at most one level: the linearization's range
        target = torch.clamp(q - step, 0, 2 ** self.bits - 1)
        gain = (grad_q * (q - target)).flatten()  # the linearized loss decrease of moving to target
        k = min(int(tau * gain.numel()), int((gain > 0).sum()))
        if k == 0:
            return 0
        chosen = torch.topk(gain, k).indices
        codes = self.codes.flatten()
        codes[chosen] = target.flatten()[chosen].to(torch.uint8)
        return k

    def to_layer(self, dtype: torch.dtype) -> LowBitLinear:
        return LowBitLinear(self.codes, self.scales.detach(), self.offsets.detach(), self.group, self.bits,
                            self.bias, dtype)


def kl_loss(model: nn.Module, seg: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || model) per token of one segment (reference: log-probabilities [len, vocab])."""
    logp = torch.log_softmax(model(seg, torch.arange(len(seg), device=seg.device)).logits.float(), -1)
    return F.kl_div(logp, reference, log_target=True, reduction="sum") / len(seg)


@register("compression", "pvtune", lossless=False)
@dataclass
class PVTune(WeightTransform):
    """PV-Tuning (Malinovskii et al., arXiv 2405.14852): fine-tunes 2- and 3-bit layers' scales (P step,
    Adam) and codes (V step: a linearized gradient step on the integer grid, applied only to the `tau`
    fraction of codes the gradient says gain most) in alternation, to match the uncompressed model's
    next-token distributions on calibration text. Follows a 2/3-bit quantizer (`decoupleq+pvtune`,
    `gptq:bits=2+pvtune`); the bytes stay the same. Left out: vector codebooks, Adam statistics in the V
    step, tuning norms and embeddings, and the paper's scale of training (CPU-sized `steps`).
    """

    stage = "compensate"
    uses_original = True

    steps: int = param(8, "rounds of (p_steps P steps, one V step), each step on one calibration segment",
                       min=1, max=10_000)
    p_steps: int = param(1, "P steps (Adam on scales and offsets) per round", min=0, max=100)
    lr: float = param(3e-4, "Adam learning rate of the P step", min=0.0, max=1.0)
    tau: float = param(0.002, "fraction of a layer's codes a V step may change", min=0.0, max=1.0)
    eta: float = param(1.0, "V step length in codes, for a gradient of unit root mean square", min=0.0, max=100.0)
    tokens: int = param(2048, "calibration tokens", min=64)
    segment: int = param(256, "tokens per calibration segment (one step's batch)", min=16)

    def apply(self, model: nn.Module, ctx: CompressionContext) -> None:
        if self.head:
            raise SpecError("pvtune: head=true is not supported; it tunes the decoder's 2- and 3-bit layers")
        sites = [s for s in self.sites(model) if isinstance(s.module, LowBitLinear)]
        if not sites:
            raise SpecError("pvtune: no 2- or 3-bit layers to tune; put it after decoupleq, gptq:bits=2|3 or "
                            "int4:bits=2|3 (e.g. decoupleq+pvtune)")
        segs = split_segments(ctx.calibration_ids(self.tokens), self.segment)
        reference = self._reference(model, ctx, sites, segs)
        tunables = {s.name: TunableAffine.of(s.module) for s in sites}
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for site in sites:
            self.replace(model, site, tunables[site.name])
        model.float()  # the compute-dtype CPU kernels (norms, attention) have no backward; float32 torch ops do
        params = [p for t in tunables.values() for p in (t.scales, t.offsets)]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        self.record = {"loss": [], "codes_changed": []}
        plan = ["p"] * self.p_steps + ["v"]
        try:
            with torch.enable_grad():
                bar = tqdm(range(self.steps * len(plan)), desc="pvtune")
                for step in bar:
                    kind, seg = plan[step % len(plan)], step % len(segs)
                    for t in tunables.values():
                        t.track = kind == "v"
                    optimizer.zero_grad(set_to_none=True)
                    loss = kl_loss(model, segs[seg], reference[seg])
                    loss.backward()
                    if kind == "p":
                        optimizer.step()
                    else:
                        changed = self._v_step(model, tunables, segs[seg], reference[seg], loss.item())
                        self.record["codes_changed"].append(changed)
                    self.record["loss"].append(loss.item())
                    bar.set_postfix(kl=f"{loss.item():.4f}", step=kind)
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)
            model.to(ctx.dtype)
            for site in sites:
                self.replace(model, site, tunables[site.name].to_layer(ctx.dtype))

    @torch.no_grad()
    def _v_step(self, model: nn.Module, tunables: dict[str, TunableAffine], seg: torch.Tensor,
                reference: torch.Tensor, before: float) -> int:
        """One V step over every layer; undone when the segment's loss rose (the linearization overshot): returns
        the codes changed, 0 when undone."""
        kept = {name: t.codes.clone() for name, t in tunables.items()}
        changed = sum(t.v_step(self.eta, self.tau) for t in tunables.values())
        for t in tunables.values():
            t.track = False
        if changed and kl_loss(model, seg, reference).item() > before:
            for name, t in tunables.items():
                t.codes.copy_(kept[name])
            self.record.setdefault("v_steps_undone", 0)
            self.record["v_steps_undone"] += 1
            return 0
        return changed

    @torch.no_grad()
    def _reference(self, model: nn.Module, ctx: CompressionContext, sites: list[LinearSite],
                   segs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The uncompressed model's next-token log-probabilities per segment (its original weights put back
        for the occasion)."""
        quantized = {s.name: s.module for s in sites}
        for site in sites:
            dense = nn.Linear(site.module.in_features, site.module.out_features, bias=site.module.bias is not None)
            dense.weight = nn.Parameter(ctx.original_weight(site.name, site.module).to(ctx.dtype), False)
            if site.module.bias is not None:
                dense.bias = site.module.bias
            self.replace(model, site, dense.to(ctx.device))
        try:
            return [torch.log_softmax(model(s, torch.arange(len(s), device=s.device)).logits.float(), -1)
                    for s in segs]
        finally:
            for site in sites:
                self.replace(model, site, quantized[site.name])
