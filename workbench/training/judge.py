"""Training the judge head of Judge Decoding (decoding/judge.py) by self-distillation.

Examples come from the target's own continuations (distill, shared with the draft heads' training): at a
position t of a sequence, the candidate tokens for position t + 1 are the target's greedy token, its next
`alternatives` most likely tokens and one uniformly random token (what a poor draft proposes). Each candidate's
input is the target's last-layer state of that token at position t + 1, computed for all candidates of a
sequence in one forward with a tree mask (each candidate sees the sequence up to t and itself). Its label:
correct when it is the greedy token or a near-tie of it (probability at least `near` times the greedy
token's under the target at t), wrong otherwise. A BCE loss weighted for the class balance trains the head
under a time budget; held-out precision and recall on the non-greedy candidates (the ones the judge decides
on) go in the checkpoint's report.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from workbench.decoding.draft_heads import final_norm
from workbench.decoding.judge import JudgeHead, judge_settings
from workbench.training.checkpoints import model_fingerprint, save_checkpoint, trained_path
from workbench.training.distill import Sequence, split
from workbench.training.heads import distilled, training_prompt_ids
from workbench.training.loop import train


@torch.no_grad()
def judge_examples(model, sequences: list[Sequence], alternatives: int, near: float, positions: int,
                   seed: int, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states [N, hidden] float32 final-normed, labels [N] float, greedy [N] bool) over the sequences."""
    generator = torch.Generator().manual_seed(seed)
    vocab, device = model.config.vocab_size, model.device
    states, labels, greedy = [], [], []
    for seq in tqdm(sequences, desc="judge examples", unit="sequence", disable=not progress):
        usable = torch.arange(seq.start, len(seq.tokens) - 1)
        if not len(usable):
            continue
        ts = usable[torch.randperm(len(usable), generator=generator)[:positions]].sort().values
        p = torch.softmax(model.logits(seq.hidden[ts].to(device, model.dtype)).float(), -1).cpu()  # [P, vocab]
        top = p.topk(alternatives + 1, dim=-1).indices  # the greedy token and the next most likely
        target = seq.tokens[ts + 1]
        rand = torch.randint(vocab, (len(ts), 1), generator=generator)
        cands = torch.cat([top, rand], 1)  # [P, alternatives + 2]
        keep = cands != target[:, None]  # the greedy token's state is the sequence's own: no branch for it
        branch_t = ts[:, None].expand_as(cands)[keep]
        branch_x = cands[keep]
        n = len(seq.tokens)
        tokens = torch.cat([seq.tokens, branch_x])
        pos = torch.cat([torch.arange(n), branch_t + 1])
        mask = torch.zeros(n + len(branch_x), n + len(branch_x), dtype=torch.bool)
        mask[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril_()
        mask[n:, :n] = torch.arange(n)[None, :] <= branch_t[:, None]  # the sequence up to t
        mask[n:, n:] = torch.eye(len(branch_x), dtype=torch.bool)  # and itself
        out = model(tokens.to(device), pos.to(device), None, mask=mask.to(device), final_hidden=True)
        branch_states = out.final_hidden[n:].float().cpu()
        p_greedy = p.gather(1, target[:, None])
        p_branch = p[torch.arange(len(ts))[:, None].expand_as(cands)[keep], branch_x]
        states += [final_norm(model, seq.hidden[ts + 1]), final_norm(model, branch_states)]
        labels += [torch.ones(len(ts)), (p_branch >= near * p_greedy.expand_as(cands)[keep]).float()]
        greedy += [torch.ones(len(ts), dtype=torch.bool), torch.zeros(len(branch_x), dtype=torch.bool)]
    return torch.cat(states), torch.cat(labels), torch.cat(greedy)


@torch.no_grad()
def precision_recall(head: JudgeHead, states: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """Over the examples given: the share of judge-accepted ones labelled correct, and of correct ones accepted."""
    accepted = torch.sigmoid(head(states)) > threshold
    correct = labels > 0.5
    return {"threshold": threshold, "examples": len(labels), "correct": int(correct.sum()),
            "accepted": int(accepted.sum()),
            "precision": float((accepted & correct).sum() / accepted.sum().clamp_min(1)),
            "recall": float((accepted & correct).sum() / correct.sum().clamp_min(1))}


def train_judge(model, prompts: list[list[int]], *, width: int = 0, minutes: float = 2.0, seed: int = 0,
                new_tokens: int = 128, eos_ids: list[int] | None = None, alternatives: int = 3, near: float = 0.5,
                positions: int = 48, sequences: int = 48, batch: int = 256, max_steps: int = 2000, lr: float = 3e-3,
                progress: bool = True) -> dict[str, Any]:
    """Train a judge head for `model` on its own continuations of `prompts` (token ids), save the checkpoint
    the `judge` acceptor loads, and return what was saved (loss curve, held-out precision and recall).
    Examples come from at most `sequences` of the continuations (each costs a forward over its sequence),
    `positions` per sequence; the held-out ones from a sixth as many of the held-out continuations."""
    continuations, distill_seconds = distilled(model, prompts, new_tokens, list(eos_ids or []), progress)
    train_seqs, held_seqs = split(continuations)
    train_seqs, held_seqs = train_seqs[:sequences], held_seqs[:max(1, sequences // 6)]
    start = time.perf_counter()
    x, y, _ = judge_examples(model, train_seqs, alternatives, near, positions, seed, progress)
    hx, hy, hgreedy = judge_examples(model, held_seqs, alternatives, near, positions, seed + 1, progress)
    examples_seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    head = JudgeHead(model.config.hidden_size, width)
    pos_weight = ((1 - y).sum() / y.sum().clamp_min(1)).clamp(0.1, 10.0)  # balance correct against wrong

    def loss_of_batch(generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(len(y), (batch,), generator=generator)
        return torch.nn.functional.binary_cross_entropy_with_logits(head(x[rows]), y[rows], pos_weight=pos_weight)

    report = train(head, loss_of_batch, minutes=minutes, max_steps=max_steps, lr=lr, seed=seed,
                   progress=progress, desc="training judge")
    drafts = ~hgreedy  # what the judge decides on: tokens the target would not have picked
    held_out = [precision_recall(head, hx[drafts], hy[drafts], t) for t in (0.5, 0.7, 0.9)]
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "settings": judge_settings(width), "curve": report.curve, "steps": report.steps,
        "train_seconds": report.seconds, "distill_seconds": distill_seconds, "examples_seconds": examples_seconds,
        "train_examples": len(y), "train_correct_share": float(y.mean()), "held_out_non_greedy": held_out,
        "alternatives": alternatives, "near": near, "positions": positions, "sequences": len(train_seqs),
        "held_out_sequences": len(held_seqs), "seed": seed,
        "model": model_fingerprint(model), "new_tokens": new_tokens, "prompts": len(prompts),
    }
    save_checkpoint(trained_path("judge", model, judge_settings(width)), payload)
    return payload


def train_command(loaded, args: argparse.Namespace) -> dict[str, Any]:
    """`workbench train judge`: train, save and print a summary."""
    report = train_judge(loaded.model, training_prompt_ids(loaded, args.prompts, args.seed), width=args.width,
                         minutes=args.minutes, seed=args.seed, new_tokens=args.new_tokens,
                         eos_ids=loaded.eos_token_ids, max_steps=args.max_steps)
    print(f"trained the judge head (width {args.width}) in {report['train_seconds']:.0f} s ({report['steps']} steps, "
          f"{report['train_examples']} examples, {report['train_correct_share']:.0%} labelled correct)")
    for row in report["held_out_non_greedy"]:
        print(f"held out, tokens the target would not pick: threshold {row['threshold']}: precision "
              f"{row['precision']:.2f}, recall {row['recall']:.2f} ({row['correct']} of {row['examples']} correct)")
    path = trained_path("judge", loaded.model, judge_settings(args.width))
    print(f"saved {path}; run it with --accept judge" + (f":width={args.width}" if args.width else ""))
    return report
