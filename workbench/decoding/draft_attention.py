"""A small trainable attention over a sequence's states, for the trained drafters that read the context.

Clover's augmenting block and attention decoder and Kangaroo's adapter each attend over states the target
computed for the tokens so far. `DraftAttention` is multi-head attention with rotary positions whose keys and
values are computed once per state: training runs it over whole sequences, decoding keeps the keys and values
of the committed positions (`KeptKeys`) and adds the new ones each step, so no state is projected twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x [B, heads, T, dim] at positions [T] (or [B, T])."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [(B,) T, dim / 2]
    if angles.dim() == 3:
        angles = angles[:, None]
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    pairs = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos + pairs * sin


class DraftAttention(nn.Module):
    def __init__(self, hidden: int, heads: int = 0):
        super().__init__()
        self.heads = heads or max(1, hidden // 64)
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # [B, T, hidden] -> [B, heads, T, dim]

    def keys(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values [B, heads, T, dim] of states x [B, T, hidden] at positions [T]."""
        return rotate(self._split(self.k(x)), positions), self._split(self.v(x))

    def attend(self, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Queries from x [B, T, hidden] at positions over keys/values; mask [(B,) T, S] bool (True = may attend)."""
        q = rotate(self._split(self.q(x)), positions)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]
        out = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o(out.transpose(-3, -2).flatten(-2))


@dataclass
class KeptKeys:
    """One attention's keys and values for the positions 0..len-1 of a run (decoding), grown and cut."""

    keys: torch.Tensor | None = None  # [1, heads, S, dim]
    values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys, self.values = torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2)

    def cut(self, length: int) -> None:
        """Keep positions 0..length-1 (drop what a rejected draft added)."""
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]


def causal_mask(query_positions: torch.Tensor, key_count: int) -> torch.Tensor:
    """[T, S] True where key position s <= the query's position."""
    return torch.arange(key_count, device=query_positions.device)[None, :] <= query_positions[:, None]
