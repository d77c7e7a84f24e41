"""SpecMemo: speculative decoding under a memory budget, the draft tree sized to fit it.

Paper: Yildirim and Chen, "SpecMemo: Speculative Decoding is in Your Pocket" (arXiv 2506.01986). Verifying a
draft tree allocates memory for every node it runs: the node's KV rows in every layer, the activations of the
forward (which for attention grow with the context each row reads) and a row of logits over the vocabulary.
SpecMemo models that footprint from the model's shapes and sizes the speculation so that it fits the memory
the device has, instead of allocating for candidates that will mostly be rejected.

Here `MemoryBudget` is a mixin every tree drafter takes (token recycling, DySpec, Medusa, Hydra, LongSpec):
`budget_mb` caps the verification's working memory. Each step the bytes of one verified row are computed from
the tensors the forward allocates (`row_bytes`: element sizes of the model's dtype and the cache's raw form,
the config's widths, the current context length), and the tree is cut to the most nodes whose rows, the root's
included, fit: the drafter's first nodes, which every drafter here lists most promising first (best-first for
DySpec, the top-ranked chain first for token recycling, paths by measured acceptance for the heads). A prefix
of the nodes is always a valid tree, as parents precede children. As the context grows each row reads more
keys, so the tree shrinks; a budget that holds no node at the prompt's length is refused before the run.

Left out: the paper's memory model of the whole engine (weights and the committed cache are not in the budget:
they are the same with and without speculation), its allocator that reuses rejected candidates' buffers, and
its multi-GPU batched setting. Only a prefix of the tree is kept, never a re-ranking of nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workbench.decoding.base import DecodeState, DraftTree
from workbench.errors import SpecError
from workbench.registry import param

if TYPE_CHECKING:
    from workbench.models.llama import LlamaModel

MB = 1 << 20


@dataclass(frozen=True)
class RowBytes:
    """Bytes one verified row (the root or a node) takes during the verification forward."""

    kv: int  # its key and value rows, and positions, in every layer's raw (uncommitted) form
    activations: int  # the largest set of one layer's activations alive at once, for this row
    logits: int  # its float32 logits and the sampler's float32 probabilities

    @property
    def total(self) -> int:
        return self.kv + self.activations + self.logits


def row_bytes(model: LlamaModel, context: int) -> RowBytes:
    """What one row of a verification forward allocates, reading `context` keys (the cache and the tree)."""
    cfg = model.config
    item = torch.empty((), dtype=model.dtype).element_size()
    position = torch.empty((), dtype=torch.long).element_size()
    # per layer: k and v [kv_heads, dim] each, and a position per kv head (DenseLayerCache's raw form)
    kv = cfg.num_layers * cfg.num_kv_heads * (2 * cfg.head_dim * item + position)
    residual = cfg.hidden_size * item
    attention = ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim  # q, k, v
                 + cfg.num_heads * context  # scores over every key read
                 + cfg.num_heads * cfg.head_dim) * item  # the attention output
    mlp = 3 * cfg.intermediate_size * item  # gate and up together, then the activation
    logits = 2 * cfg.vocab_size * torch.empty((), dtype=torch.float32).element_size()
    return RowBytes(kv, residual + max(attention, mlp), logits)


@dataclass
class MemoryBudget:
    """Mixin for tree drafters: `budget_mb` sizes each step's tree to the verification memory (SpecMemo)."""

    budget_mb: float = param(0.0, "SpecMemo: memory for verifying a tree, in MB (the tree's KV rows, activations "
                             "and logits); the tree is cut to fit each step; 0: no budget", min=0.0, max=1e6)

    def node_limit(self, model: LlamaModel, context: int) -> int | None:
        """The most tree nodes whose verification fits the budget at `context` tokens; None without a budget."""
        if not self.budget_mb:
            return None
        budget = int(self.budget_mb * MB)
        rows = budget // row_bytes(model, context + 1).total  # an upper bound: rows read context + rows keys
        while rows and rows * row_bytes(model, context + rows).total > budget:
            rows -= 1
        return max(rows - 1, 0)  # the root's row is verified whatever the tree

    def check_run(self, model: LlamaModel, prompt_tokens: int) -> None:
        if self.node_limit(model, prompt_tokens) == 0:
            need = row_bytes(model, prompt_tokens + 2)  # the root and one node, after the prompt
            raise SpecError(f"{self.technique_name}: budget_mb={self.budget_mb:g} holds no tree node at this prompt's "
                            f"length ({prompt_tokens} tokens): the root and one node need "
                            f"{2 * need.total / MB:.3f} MB on this model ({need.kv} B of KV rows, "
                            f"{need.activations} B of activations and {need.logits} B of logits per row); "
                            "give a larger budget_mb, or 0 for none")

    def fit(self, state: DecodeState, tree: DraftTree) -> DraftTree:
        limit = self.node_limit(state.model, state.pending_position)
        if limit is None or len(tree) <= limit:
            return tree
        probs = tree.draft_probs[:limit] if tree.draft_probs is not None else None
        return DraftTree(tree.tokens[:limit], tree.parents[:limit], probs)
