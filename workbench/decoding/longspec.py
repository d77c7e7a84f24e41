"""LongSpec: a drafter whose memory does not grow with the context, drafting trees the target verifies at length.

Paper: Yang et al., "LongSpec: Long-Context Speculative Decoding with Efficient Drafting and Verification"
(arXiv 2502.17421). At long context a draft model with its own full KV cache costs memory and reads that grow
with the context, as the target's do. LongSpec's draft keeps a constant-size view instead: a sliding window of
recent keys (with the first tokens, the attention sinks) for its own attention, and it reads the target's cache
rather than building a second one; its position indices are anchored (Anchor-Offset Indices) so that a draft
trained on short text behaves at long positions; and the tree it drafts is verified with Hybrid Tree
Attention, where the long cached prefix is attended without a mask and only the few tree rows need one.

Here the draft is the target's own first `layers` layers, with its final norm and LM head (no second model,
no training). The keys and values of those layers are exactly what the target already holds in its cache for
them, so each step the draft's cache is gathered from the target's: the first `sink` tokens and the last
`window` committed tokens of each of its layers. That view is constant-size whatever the context (its bytes are
reported as `draft_cache_bytes`). The draft runs the pending token over it, then grows a tree best-first by
draft path probability (DySpec's growth, decoding/dyspec.py: `budget` nodes, `per_round` per draft forward),
and the target verifies the tree over its full cache. Verification is matched against the target's own choices
(greedy or sampled), so the output is exactly the target's: lossless. The engine's tree attention already
splits the forward as LongSpec's Hybrid Tree Attention does (every cached key visible, the mask only over the
tree's own rows), so verification costs the same at length as a plain step's attention plus the tree's rows.

Left out: LongSpec's trained one-layer draft with cross-attention into the target's cache, and the
Anchor-Offset Indices that train it (a draft made of the target's own layers already knows every position, so
positions here are the real ones, the sinks anchored at 0); its FlashAttention kernels. The draft reads the
sink and window rows through the cache policy's `view()`, which for two-tier policies rebuilds the whole view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.cache.base import KVCache
from workbench.cache.dense import DenseLayerCache
from workbench.decoding.base import Drafter, DraftTree
from workbench.decoding.dyspec import grow_tree
from workbench.decoding.specmemo import MemoryBudget
from workbench.errors import SpecError
from workbench.registry import param, register


@register("decoding", "longspec", lossless=True)
@dataclass
class LongSpec(MemoryBudget, Drafter):
    """Draft a tree with the target's first layers over a constant-size view of its cache (sinks + a window)."""

    default_acceptor = "match"

    layers: int = param(4, "target layers the draft runs (then the final norm and LM head)", min=1, max=512)
    sink: int = param(16, "first tokens of the context the draft always sees (attention sinks)", min=0, max=4096)
    window: int = param(256, "most recent committed tokens the draft sees", min=1, max=1 << 16)
    budget: int = param(12, "most nodes in a tree", min=1, max=256)
    per_round: int = param(4, "nodes added per draft forward", min=1, max=64)
    top: int = param(4, "candidates taken from each node's draft distribution", min=1, max=32)
    max_depth: int = param(8, "deepest node", min=1, max=64)
    draft_cache_bytes: int = field(init=False, default=0)  # bytes of the draft's view at the last step
    _plan: list[int] = field(init=False, default_factory=list)

    def begin(self, state) -> None:
        n_layers = state.model.config.num_layers
        if self.layers >= n_layers:
            raise SpecError(f"longspec: layers={self.layers} must be fewer than the target's {n_layers} layers")
        self._plan = list(range(self.layers))

    def _view(self, state) -> KVCache:
        """The draft's cache: each draft layer's sinks and recent window, gathered from the target's cache."""
        layers = []
        for target in state.cache.layers[: self.layers]:
            n = target.n_committed
            keys, values = target.view()
            slots = torch.arange(n) if n <= self.sink + self.window else \
                torch.cat([torch.arange(self.sink), torch.arange(n - self.window, n)])
            slots = slots.to(keys.device)
            index = slots[None, :, None].expand(keys.shape[0], -1, keys.shape[2])
            mine = DenseLayerCache(keys.shape[0], keys.shape[2], keys.dtype, keys.device,
                                   len(slots) + 1 + self.budget)
            mine.append(keys.gather(1, index), values.gather(1, index), target.positions[:, slots])
            mine.n_committed = mine.length
            layers.append(mine)
        return KVCache(layers)

    def propose(self, state) -> DraftTree:
        model, sampler, device = state.model, state.sampler, state.model.device
        cache = self._view(state)
        root = state.pending_position
        logits = model(torch.tensor([state.pending], device=device), torch.tensor([root], device=device), cache,
                       layers=self._plan, last_only=True).logits[0]
        cache.commit()
        self.draft_cache_bytes = cache.allocated_bytes()

        def expand(tokens: list[int], parents: list[int], wanted: list[int]) -> list[torch.Tensor]:
            tree = DraftTree(tokens, parents)
            out = model(torch.tensor(tokens, device=device), tree.positions(root, device)[1:], cache,
                        mask=tree.attention_mask(device)[1:, 1:], layers=self._plan).logits
            cache.rollback()
            return list(sampler.probs(out[wanted]))

        limit = self.node_limit(model, root)  # SpecMemo's budget, when one is given: draft no more than fits
        budget = self.budget if limit is None else min(self.budget, limit)
        return grow_tree(sampler.probs(logits), expand, budget, self.per_round, self.top, self.max_depth)
