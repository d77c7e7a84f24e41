"""Judge Decoding: accept a draft token the target would not have picked when a small trained judge, reading
the target's own last-layer state of that token, says it is correct. LOSSY.

Paper: Bachmann et al., "Judge Decoding: Faster Speculative Sampling Requires Going Beyond Model Alignment"
(arXiv 2501.19309, ICLR 2025). Verification rejects good drafts that merely differ from the target's choice
(a synonym, another correct way to write the code). The target's final-layer embeddings of the draft tokens,
computed anyway in the verification forward, already tell whether a token is a correct continuation: a
linear head on them, trained on examples labelled correct or wrong, judges each draft token, and a token is
accepted when standard verification accepts it OR the judge's probability exceeds a threshold; the first
token that neither accepts ends the step with the target's own token.

Here the acceptor walks the draft tree as matching does (decoding/match.py): where a child carries the
target's choice it is accepted; otherwise the first child whose judge score exceeds `threshold` is accepted,
and the walk goes on from it. The judge reads the final-normed state of the draft token's own row of the
verification forward (`DecodeState.tree_hidden`), so it works over any drafter. At `threshold=1` it never
overrules the target and the output is matching's, token for token. The head is trained here
(`workbench train judge`, workbench/training/judge.py) by self-distillation: the labels say whether a token
is the target's greedy choice or a near-tie of it (its probability at least `near` times the greedy token's).

Left out: the paper's labels (correct / wrong judged by people and a large model on a curated dataset, so the
judge learns semantic correctness, not the target's preference), its 8B/70B targets and its
draft-model-specific training; here a near-tie label makes the judge an estimate of the target's own
ambivalence, read from the draft token's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.decoding.base import DecodeState, DraftTree
from workbench.decoding.draft_heads import final_norm
from workbench.decoding.match import MatchAcceptor
from workbench.errors import SpecError
from workbench.registry import param, register
from workbench.training.checkpoints import load_checkpoint, trained_path


class JudgeHead(torch.nn.Module):
    """hidden [N, hidden] (the target's final-normed state of each token) -> logit [N] that it is correct.
    width 0 is the paper's linear head; otherwise one hidden layer of that width."""

    def __init__(self, hidden_size: int, width: int = 0):
        super().__init__()
        self.net = torch.nn.Linear(hidden_size, 1) if width == 0 else torch.nn.Sequential(
            torch.nn.Linear(hidden_size, width), torch.nn.SiLU(), torch.nn.Linear(width, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden).squeeze(-1)


def judge_settings(width: int) -> dict[str, int]:
    """What a judge checkpoint is keyed by (besides the model)."""
    return {"width": width}


@register("acceptance", "judge", lossless=False)
@dataclass
class JudgeAcceptance(MatchAcceptor):
    """Also accept a draft token the target did not pick when a trained judge head says it is correct (lossy)."""

    threshold: float = param(0.9, "judge probability above which a draft token the target did not pick is "
                             "accepted; 1 never overrules the target (matching's output)", min=0.0, max=1.0)
    width: int = param(0, "hidden width of the judge head it loads; 0: a linear head (the paper's)", min=0, max=4096)
    _state: DecodeState | None = field(init=False, default=None, repr=False)
    _head: JudgeHead | None = field(init=False, default=None, repr=False)

    def begin(self, state: DecodeState) -> None:
        model = state.model
        key = f"judge:width={self.width}"
        if key not in state.memory:  # loaded once per model
            payload = load_checkpoint(trained_path("judge", model, judge_settings(self.width)))
            if payload is None:
                raise SpecError(f"no judge trained for this model (width {self.width}); train one with `workbench "
                                "train judge` (add --model for another model, --width for another width)")
            head = JudgeHead(model.config.hidden_size, self.width)
            head.load_state_dict(payload["state_dict"])
            state.memory[key] = head.to(model.device).eval()
        self._state, self._head = state, state.memory[key]

    def wants_tree_states(self) -> bool:
        return True

    @torch.no_grad()
    def judged(self, tree: DraftTree) -> list[bool]:
        """Per node: does the judge accept its token (score above the threshold)?"""
        if not len(tree) or self.threshold >= 1.0:
            return [False] * len(tree)
        states = final_norm(self._state.model, self._state.tree_hidden[1: len(tree) + 1])
        return (torch.sigmoid(self._head(states)) > self.threshold).tolist()

    def rescued(self, tree: DraftTree) -> list[bool]:
        return self.judged(tree)  # matching's walk, where the judge may accept a child the target did not pick
