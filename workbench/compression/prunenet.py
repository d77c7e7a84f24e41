"""PruneNet: calibration-free structured pruning of MLP channels, learned as a policy over the weights.

Paper: "You Only Prune Once: Designing Calibration-Free Model Compression With Policy Learning", Sengupta et
al., ICLR 2025, arXiv 2501.15296.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.compression.base import CompressionContext, WeightTransform, dense_weight, parse_layers, selects
from workbench.errors import SpecError
from workbench.registry import param, register


class RowPolicy(nn.Module):
    """The policy: a two-layer network scoring each row of an intermediate (gate) weight [I, H] -> logits [I].
    A row's keep probability is sigmoid(logit). One policy serves every layer (rows of any layer count)."""

    def __init__(self, hidden_size: int, width: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(hidden_size, width, generator=g) / hidden_size ** 0.5)
        self.out = nn.Parameter(torch.randn(width, generator=g) / width ** 0.5)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows / rows.pow(2).mean().sqrt().clamp(min=1e-12)  # the layer's scale does not change its logits
        return torch.tanh(rows @ self.proj) @ self.out


def spectrum(w: torch.Tensor) -> torch.Tensor:
    """Singular values of w [rows, cols], float32, ascending: for rows >= cols the square roots of the
    eigenvalues of wᵀw [cols, cols] (a few times faster than an SVD of the tall matrix)."""
    w = w.float()
    if w.shape[0] >= w.shape[1]:
        return torch.linalg.eigvalsh(w.T @ w).clamp(min=0).sqrt()  # eigvalsh: ascending
    return torch.linalg.svdvals(w).sort().values


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of sorted a and b."""
    points = torch.cat((a, b))
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def kept_count(intermediate: int, ratio: float, multiple: int) -> int:
    """Channels kept of `intermediate` when pruning `ratio` of them, rounded to a multiple of `multiple`."""
    keep = int(round((1 - ratio) * intermediate / multiple)) * multiple
    if not multiple <= keep <= intermediate:
        raise SpecError(f"prunenet: ratio={ratio} keeps {keep} of {intermediate} MLP channels in multiples of "
                        f"{multiple}; choose a ratio that keeps between {multiple} and {intermediate}")
    return keep


def learn_policy(gates: list[torch.Tensor], keep: int, episodes: int, width: int, lr: float, seed: int,
                 progress: bool = True) -> tuple[RowPolicy, list[float]]:
    """REINFORCE on the gate weights [I, H] alone (no data): each episode samples a keep set per layer from
    the policy, rewards it with −KS(spectrum of the kept rows, the full matrix's spectrum), and steps the
    policy up the advantage-weighted log-likelihood of what it sampled. Returns the policy and the mean
    reward per episode."""
    policy = RowPolicy(gates[0].shape[1], width, seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    targets = [spectrum(w) for w in gates]
    baselines: list[float | None] = [None] * len(gates)  # per-layer moving average of the reward
    history = []
    with torch.enable_grad():
        for _ in tqdm(range(episodes), desc="prunenet: policy episodes", disable=not progress):
            loss, rewards = torch.zeros(()), []
            for i, (w, target) in enumerate(zip(gates, targets)):
                logits = policy(w)
                # Sampling each row's relaxed Bernoulli (logit + logistic noise) and keeping the top `keep`.
                u = torch.rand(len(logits), generator=g).clamp(1e-6, 1 - 1e-6)
                kept = (logits.detach() + torch.log(u) - torch.log1p(-u)).topk(keep).indices
                mask = torch.zeros(len(logits), dtype=torch.bool)
                mask[kept] = True
                reward = -ks_distance(spectrum(w[mask]), target)
                rewards.append(reward)
                base = reward if baselines[i] is None else baselines[i]
                baselines[i] = 0.9 * base + 0.1 * reward
                log_prob = F.logsigmoid(logits)[mask].sum() + F.logsigmoid(-logits)[~mask].sum()
                loss = loss - (reward - base) * log_prob / len(gates)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(sum(rewards) / len(rewards))
    return policy, history


@register("compression", "prunenet", lossless=False)
@dataclass
class PruneNet(WeightTransform):
    """PruneNet (Sengupta et al., "You Only Prune Once: Designing Calibration-Free Model Compression With
    Policy Learning", arXiv 2501.15296): structured pruning of MLP intermediate channels with no calibration
    data, the channels chosen by a policy learned from the weights alone.

    A two-layer network scores every row of each layer's gate projection; a row's keep probability is the
    sigmoid of its score. The policy is trained by REINFORCE: per episode it samples which rows each layer
    keeps (relaxed Bernoulli noise, top `ratio`-complement), and the reward is how well the kept rows preserve
    the matrix's spectrum: minus the Kolmogorov-Smirnov distance between the singular values of the kept
    rows and of the full matrix (the paper's spectrum-preserving objective). The learned policy then keeps
    each layer's highest-scoring channels: the gate and up rows and the down columns of the dropped
    channels are removed, so the layers really are smaller (plain dense linears, so quantizers can follow:
    `prunenet+int4`). Runs first in a chain (stage `slice`). Left out: the paper's recovery fine-tuning, its
    reciprocal-KS reward (here −KS with a per-layer moving-average baseline), and sampling the channels at
    compression time (here the top scores, so a spec always gives the same model).
    """

    stage = "slice"
    needs_dense = True
    reshapes = True

    head: bool = param(False, "does not apply (prunenet prunes decoder MLPs; true is refused)")
    ratio: float = param(0.25, "fraction of each layer's MLP channels removed", min=0.01, max=0.95)
    multiple: int = param(64, "kept channels are a multiple of this (so int4 groups still divide them)", min=1)
    episodes: int = param(20, "policy-learning episodes (each scores every layer once)", min=1, max=10_000)
    width: int = param(64, "hidden width of the policy network", min=1, max=4096)
    lr: float = param(0.01, "policy learning rate (Adam)", min=1e-6, max=1.0)
    seed: int = param(0, "seed of the policy's initialisation and its sampling")

    def check(self) -> None:
        if self.head:
            raise ValueError("head=true does not apply: prunenet removes MLP channels of decoder layers")

    def keeps_dense(self) -> bool:
        return True

    def apply(self, model: nn.Module, ctx: CompressionContext) -> None:
        chosen = parse_layers(self.layers, len(model.layers))
        layers = [layer for i, layer in enumerate(model.layers)
                  if selects(chosen, f"layers.{i}.gate_up") or selects(chosen, f"layers.{i}.down")]
        if not layers:
            raise SpecError(f"prunenet: layers={self.layers!r} names no MLP (gate_up or down) to prune")
        intermediate = layers[0].down.in_features
        keep = kept_count(intermediate, self.ratio, self.multiple)
        # [I, H]: the gate rows of gate | up; the policy learns on the CPU (small), so every device prunes alike
        gates = [dense_weight(layer.gate_up).float()[:intermediate].cpu() for layer in layers]
        policy, _ = learn_policy(gates, keep, self.episodes, self.width, self.lr, self.seed)
        with torch.no_grad():
            for layer, gate in zip(layers, gates):
                kept = policy(gate).topk(keep).indices.sort().values
                slice_mlp(layer, kept, intermediate)


def slice_mlp(layer: nn.Module, kept: torch.Tensor, intermediate: int) -> None:
    """Keep MLP channels `kept` of a decoder layer: gate and up rows, down columns, as new smaller linears."""
    gate_up, down = dense_weight(layer.gate_up), dense_weight(layer.down)
    rows = torch.cat((kept, kept + intermediate)).to(gate_up.device)
    new_gate_up = nn.Linear(gate_up.shape[1], len(rows), bias=False, device=gate_up.device, dtype=gate_up.dtype)
    new_gate_up.weight = nn.Parameter(gate_up[rows].clone(), requires_grad=False)
    new_down = nn.Linear(len(kept), down.shape[0], bias=False, device=down.device, dtype=down.dtype)
    new_down.weight = nn.Parameter(down[:, kept.to(down.device)].clone(), requires_grad=False)
    layer.gate_up, layer.down = new_gate_up, new_down
