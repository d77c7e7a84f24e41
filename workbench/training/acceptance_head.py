"""SpecDec++'s acceptance head, trained on the target's own continuations (`workbench train specdec`).

Paper: Huang et al., "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths", arXiv
2405.19715. The head is a small classifier on the draft model's last-layer state (after its final norm) at the
row a token is drafted from; it predicts whether the target will accept that token, given that the tokens
before it were accepted. Decoding (`adaptive:policy=specdec++,head=trained`) stops drafting once the predicted
probability that at least one drafted token is rejected, 1 - prod_j p_j, exceeds the threshold.

Examples: the draft runs teacher-forced over the target's greedy continuations (distill): a context whose
earlier tokens are the target's own is exactly one in which the earlier drafts were accepted. At a position
t the draft's greedy token is accepted when it equals the target's token at t + 1. The loss is the paper's
weighted binary cross-entropy, the rejections weighted up by the class ratio (they are the rarer class and
the ones that end a draft). Left out: the paper's labels under sampling (min(1, p/q) of a drafted token drawn
from the draft's distribution; here the labels are greedy acceptance, what the benchmarks run) and its
ResNet-style head (one hidden layer here).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import torch

from workbench.decoding.draft_heads import final_norm
from workbench.decoding.judge import JudgeHead
from workbench.training.checkpoints import model_fingerprint, save_checkpoint, trained_path
from workbench.training.loop import train

if TYPE_CHECKING:
    from workbench.decoding.draft_model import DraftModel
    from workbench.training.distill import Sequence

HEAD_WIDTH = 128  # the head's hidden layer


def built_draft(model, drafter: str) -> DraftModel:
    """The chain drafter `drafter` (a technique string naming draft_model) set up on `model`, as a run would."""
    from workbench.decoding.base import DecodeState
    from workbench.sampling import Sampler
    from workbench.spec import TechniqueSpec

    inner = TechniqueSpec.parse(drafter).validated("decoding").build("decoding")
    inner.begin(DecodeState(model, None, Sampler(), [0]))
    return inner


def acceptance_settings(draft: DraftModel) -> dict[str, Any]:
    """What a head is keyed by (besides the target): the draft it reads (begun), not how much it drafts."""
    layers = len(draft._plan) if draft._plan is not None else draft._model.config.num_layers
    return {"draft": draft.draft, "layers": layers, "compress": draft.compress}


@torch.no_grad()
def acceptance_examples(draft: DraftModel, sequences: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [N, hidden] float32, final-normed; labels [N]: whether the draft's greedy token is the target's)."""
    model, states, labels = draft._model, [], []
    for seq in sequences:
        rows = torch.arange(seq.start, len(seq.tokens) - 1)
        if not len(rows):
            continue
        tokens = seq.tokens.to(model.device)
        out = model(tokens, torch.arange(len(tokens), device=model.device), None, layers=draft._plan,
                    last_only=True, final_hidden=True)
        final = out.final_hidden[rows]
        guess = model.logits(final).argmax(-1).cpu()
        states.append(final_norm(model, final).cpu())
        labels.append((guess == seq.tokens[rows + 1]).float())
    return torch.cat(states), torch.cat(labels)


@torch.no_grad()
def held_out_report(head: JudgeHead, states: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy at 0.5, the mean predicted against the true acceptance rate, and the area under the ROC curve."""
    p = torch.sigmoid(head(states))
    order = p.argsort()
    ranks = torch.empty_like(p)
    ranks[order] = torch.arange(1, len(p) + 1, dtype=p.dtype)
    positives = labels.sum()
    negatives = len(labels) - positives
    auc = (ranks[labels > 0.5].sum() - positives * (positives + 1) / 2) / (positives * negatives).clamp_min(1)
    return {"examples": len(labels), "accepted_share": float(labels.mean()), "mean_predicted": float(p.mean()),
            "accuracy": float(((p > 0.5).float() == labels).float().mean()), "auc": float(auc)}


def train_acceptance_head(model, prompts: list[list[int]], drafter: str = "draft_model", *, minutes: float = 2.0,
                          seed: int = 0, new_tokens: int = 128, eos_ids: list[int] | None = None, batch: int = 256,
                          max_steps: int = 2000, lr: float = 3e-3, progress: bool = True) -> dict[str, Any]:
    """Train the acceptance head of `drafter` (a draft_model technique string) for `model` and save it."""
    from workbench.training.distill import split
    from workbench.training.heads import distilled

    sequences, distill_seconds = distilled(model, prompts, new_tokens, list(eos_ids or []), progress)
    train_seqs, held_seqs = split(sequences)
    draft = built_draft(model, drafter)
    x, y = acceptance_examples(draft, train_seqs)
    hx, hy = acceptance_examples(draft, held_seqs)
    torch.manual_seed(seed)
    head = JudgeHead(x.shape[1], HEAD_WIDTH)
    reject_weight = float((y.sum() / (1 - y).sum().clamp_min(1)).clamp(1.0, 20.0))

    def loss_of_batch(generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(len(y), (batch,), generator=generator)
        weight = torch.where(y[rows] > 0.5, 1.0, reject_weight)  # the paper's w_acc = 1, w_rej
        return torch.nn.functional.binary_cross_entropy_with_logits(head(x[rows]), y[rows], weight=weight)

    report = train(head, loss_of_batch, minutes=minutes, max_steps=max_steps, lr=lr, seed=seed,
                   progress=progress, desc="training specdec head")
    settings = acceptance_settings(draft)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}, "settings": settings,
        "drafter": drafter, "reject_weight": reject_weight, "held_out": held_out_report(head, hx, hy),
        "curve": report.curve, "steps": report.steps, "train_seconds": report.seconds,
        "distill_seconds": distill_seconds, "train_examples": len(y), "seed": seed,
        "model": model_fingerprint(model), "new_tokens": new_tokens, "prompts": len(prompts),
    }
    save_checkpoint(trained_path("specdec", model, settings), payload)
    return payload


def train_command(loaded, args: argparse.Namespace) -> dict[str, Any]:
    """`workbench train specdec`: train, print what came of it, return the report."""
    from workbench.spec import TechniqueSpec
    from workbench.training.heads import training_prompt_ids

    report = train_acceptance_head(loaded.model, training_prompt_ids(loaded, args.prompts, args.seed), args.drafter,
                                   minutes=args.minutes, seed=args.seed, new_tokens=args.new_tokens,
                                   eos_ids=loaded.eos_token_ids, max_steps=args.max_steps)
    held = report["held_out"]
    print(f"trained the SpecDec++ acceptance head of {args.drafter} in {report['train_seconds']:.0f} s "
          f"({report['steps']} steps, {report['train_examples']} examples, rejections weighted "
          f"{report['reject_weight']:.1f})")
    print(f"held out: {held['accepted_share']:.0%} of drafts accepted, {held['mean_predicted']:.0%} predicted; "
          f"accuracy {held['accuracy']:.2f}, AUC {held['auc']:.2f}")
    path = trained_path("specdec", loaded.model, report["settings"])
    params = {"head": "trained"} if args.drafter == "draft_model" else {"drafter": args.drafter, "head": "trained"}
    print(f"saved {path}; run it with --decode {TechniqueSpec('adaptive', params).to_string()}")
    return report
