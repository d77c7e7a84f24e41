"""Lexical-unit acceptance ("Decoding at the Speed of Thought"): commit a drafted multi-token unit without
the target's check where the parallel prediction is confident. LOSSY.

Paper: Sun et al., "Accelerating LLM Inference with Lexical Unit Decoding" ("Decoding at the Speed of
Thought", arXiv 2405.15208). There the model predicts the next k tokens in parallel; the leading tokens whose
confidence exceeds a threshold form a lexical unit, committed at once without verification, and decoding
resumes after it. Here the parallel prediction is a drafter's chain and its confidence is the drafter's own
probability q(x) of each drafted token (`DraftTree.draft_probs`): the accepted unit is the longest prefix of
the first-child path whose every token has q(x) >= `threshold`, whatever the target thinks of it; the
target's distribution after the unit gives the next token (argmax at temperature 0, a draw otherwise), so a
step commits at least the target's own token. Because unverified tokens are committed, the output departs
from plain decoding's (it is labelled lossy everywhere).

Left out: the paper's fine-tuning of the target itself to predict units (here any drafter that reports its
draft distribution predicts them: draft_model, layer_skip, rsd...; others are refused when the spec is
checked), and its unit-aware training data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decoding.base import ROOT, Acceptance, Acceptor, Drafter, DraftTree
from workbench.errors import SpecError
from workbench.registry import param, register, techniques
from workbench.sampling import Sampler, argmax_rows


@register("acceptance", "lexical_unit", lossless=False)
@dataclass
class LexicalUnitAcceptance(Acceptor):
    """Commit the drafted prefix whose draft confidence beats a threshold, unverified (lossy)."""

    threshold: float = param(0.8, "draft probability each token of a committed unit must reach", min=0.0, max=1.0)

    def check_drafter(self, drafter: Drafter) -> None:
        if not getattr(drafter, "draft_distribution", False):
            able = ", ".join(t.name for t in techniques("decoding") if getattr(t.cls, "draft_distribution", False)
                             and not t.name.startswith("_"))
            raise SpecError(f"lexical_unit reads the draft distribution, which {drafter.technique_name} does not "
                            f"report; use a drafter that does ({able})")

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        accepted: list[int] = []
        if len(tree):
            children = tree.children()
            node = ROOT
            while True:  # down the first-child path while the drafter was confident
                child = next(iter(children[node]), None)
                if child is None or float(tree.draft_probs[child, tree.tokens[child]]) < self.threshold:
                    break
                accepted.append(child)
                node = child
        row = (accepted[-1] + 1) if accepted else 0
        bonus = argmax_rows(logits[row:row + 1])[0] if sampler.greedy else int(sampler.draw(probs[row]))
        return Acceptance(accepted, bonus)
