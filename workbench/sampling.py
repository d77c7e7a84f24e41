"""The sampler: logits processing (temperature, top-k, top-p, min-p) and seeded sampling.

Drafters and acceptors use the same processing for draft and target distributions, so speculative
sampling compares like with like. Greedy (temperature 0) is argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.kernels import dispatch


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of a 2-D tensor, descending, and their indices, as torch.topk (the
    `topk` operation of `workbench.kernels.dispatch`). On the CPU the C kernel does it in about one read of the
    row; equal values come in index order, so k = 1 picks torch.argmax's token."""
    return dispatch.kernels(x.device, x.dtype).topk(x, k)


def argmax_rows(x: torch.Tensor) -> list[int]:
    """torch.argmax of each row of a 2-D tensor (the first maximum), as a list: the greedy choices."""
    return top_k(x, 1)[1][:, 0].tolist()


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    device: torch.device | str = "cpu"
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampling draws from, [..., vocab] float32.

        Order as in transformers: temperature, then top-k, top-p and min-p filters. Under greedy decoding
        this is the plain softmax (temperature 1), which is what views show as a token's probability.
        """
        logits = logits.float()
        if self.greedy:
            return torch.softmax(logits, dim=-1)
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # drop a token when the tokens before it already reach top_p (the first always stays)
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.min_p > 0:
            keep = probs >= self.min_p * probs.amax(dim=-1, keepdim=True)
            probs = probs * keep
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def entropy(self, logits: torch.Tensor, probs: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """Entropy in nats of each row of `probs` = `self.probs(logits)`, [..., 1], given each row's most
        probable token `top` [..., 1]: without a logarithm per token.

        Every filter here keeps p proportional to exp(z / T) on the tokens it keeps, so
        H = log Z - sum(p * z) / T, where log Z = z_top / T - log p_top from any kept token."""
        z = logits.float() if self.greedy else logits.float() / self.temperature
        expected = (probs.unsqueeze(-2) @ z.unsqueeze(-1)).squeeze(-1)  # sum(p * z) without a [..., vocab] temporary
        h = z.gather(-1, top) - probs.gather(-1, top).log() - expected
        return h.clamp_min(0.0)  # float32 rounding can leave -1e-6 for a certain token

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of logits [..., vocab] -> [...] int64."""
        if self.greedy:
            return logits.argmax(dim=-1)
        return self.draw(self.probs(logits))

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """Sample from already-processed probabilities [..., vocab] with this run's generator."""
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).reshape(probs.shape[:-1])
