"""Plain autoregressive decoding: the drafter that proposes nothing.

One target forward per token. It is the baseline every speed-up is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.decoding.base import Drafter, DraftTree
from workbench.registry import register


@register("decoding", "plain", lossless=True)
@dataclass
class PlainDecoding(Drafter):
    """One token per target forward; the baseline for every speed-up."""

    def propose(self, state) -> DraftTree:
        return DraftTree()
