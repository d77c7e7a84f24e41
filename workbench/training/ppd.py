"""Training PPD's prompt tokens (decoding/ppd.py) by backpropagation through the frozen target.

Data: the target's own greedy continuations (distill, shared with the draft heads). A batch packs the last
`window` tokens of a few sequences, each under its own causal mask, and hangs `m` prompt tokens after every
position t whose next-but-one token is the target's own choice: prompt token j sits at position t + 1 + j,
sees the sequence up to t and its group's prompt tokens up to itself (the mask decoding uses), and learns to
predict the token at t + 2 + j. The loss is the cross-entropy of those predictions; only the prompt tokens'
embeddings [m, hidden] get gradients, through a float32 copy of the target whose weights never change. Every
position of a window is a host, so each forward through the model trains on about m times as many
predictions as it has tokens. Held-out top-k acceptance per prompt token shapes the decoding tree.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import torch

from workbench.decoding.ppd import PromptTokens
from workbench.errors import SpecError
from workbench.training.checkpoints import model_fingerprint, save_checkpoint, trained_path
from workbench.training.loop import train

if TYPE_CHECKING:
    from workbench.training.distill import Sequence


def hosts_of(seq: Sequence, first: int) -> torch.Tensor:
    """Positions t >= first of `seq` whose token t + 2 exists and is the target's own choice."""
    return torch.arange(max(first, seq.start - 1), len(seq.tokens) - 2)


def prompt_batch(sequences: list[Sequence], m: int, tokens: int, window: int, generator: torch.Generator | None):
    """Random sequences' last `window` tokens packed up to `tokens` tokens (all of `sequences` in turn when
    `generator` is None), with m prompt tokens after every host: (ids [R], positions [R + P], slots [P],
    mask [R + P, R + P], labels [P]) where R real tokens come first, then P = m x hosts prompt tokens."""
    ids, positions, slots, labels, hosts = [], [], [], [], []  # hosts: (row of the host, row its block starts)
    rows, order = 0, iter(sequences)
    while rows < tokens:
        if generator is None:
            seq = next(order, None)
            if seq is None:
                break
        else:
            seq = sequences[int(torch.randint(len(sequences), (1,), generator=generator))]
        first = max(0, len(seq.tokens) - window)
        ts = hosts_of(seq, first)
        if not len(ts):
            continue
        ids.append(seq.tokens[first:])
        positions.append(torch.arange(first, len(seq.tokens)))
        padded = torch.cat([seq.tokens, torch.full((m,), -1, dtype=seq.tokens.dtype)])
        labels.append(padded[ts[:, None] + 2 + torch.arange(m)].flatten())  # [hosts x m]
        hosts += [(rows + int(t) - first, rows) for t in ts]
        rows += len(seq.tokens) - first
    real = torch.cat(ids)
    count = len(hosts) * m
    mask = torch.zeros(rows + count, rows + count, dtype=torch.bool)
    start = 0
    for block in positions:  # each sequence causal on its own
        n = len(block)
        mask[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    real_positions = torch.cat(positions)
    prompt_positions = []
    for g, (host, block_start) in enumerate(hosts):
        for j in range(m):
            row = rows + g * m + j
            mask[row, block_start:host + 1] = True  # the sequence up to the host
            mask[row, rows + g * m:row + 1] = True  # the group's prompt tokens up to itself
            prompt_positions.append(int(real_positions[host]) + 1 + j)
            slots.append(j)
    return (real, torch.cat([real_positions, torch.tensor(prompt_positions, dtype=torch.long)]),
            torch.tensor(slots), mask, torch.cat(labels))


def prompt_logits(model, module: PromptTokens, real, positions, slots, mask) -> torch.Tensor:
    """[P, vocab] float32 logits of the prompt tokens of a `prompt_batch`."""
    embeds = torch.cat([model.embed(real).float(), module.embeds[slots]])
    ids = torch.cat([real, torch.zeros(len(slots), dtype=real.dtype)])
    final = model(ids, positions, None, mask, last_only=True, final_hidden=True, embeds=embeds).final_hidden
    return model.logits(final[len(real):])


@torch.no_grad()
def acceptance(model, module: PromptTokens, sequences: list[Sequence], window: int, width: int = 8,
               tokens: int = 256) -> list[list[float]]:
    """acc[j][i]: how often prompt token j's i-th ranked guess is the target's token, over `sequences`."""
    m = len(module.embeds)
    hits, counts = torch.zeros(m, width), torch.zeros(m)
    for i in range(0, len(sequences), 4):
        real, positions, slots, mask, labels = prompt_batch(sequences[i:i + 4], m, tokens, window, None)
        ranked = prompt_logits(model, module, real, positions, slots, mask).topk(width, dim=-1).indices
        right = (ranked == labels[:, None]) & (labels >= 0)[:, None]
        hits.index_add_(0, slots, right.float())
        counts.index_add_(0, slots, (labels >= 0).float())
    return (hits / counts.clamp_min(1)[:, None]).tolist()


def train_ppd(target, prompts: list[list[int]], m: int, *, minutes: float, seed: int = 0, new_tokens: int = 128,
              eos_ids: list[int] | None = None, max_steps: int = 4000, batch_tokens: int = 32, window: int = 32,
              lr: float = 1e-2, progress: bool = True) -> dict[str, Any]:
    """Train `m` prompt tokens for `target` on its own continuations of `prompts` and save the checkpoint."""
    from workbench.decoding.fastdraft import new_draft
    from workbench.training.distill import split
    from workbench.training.heads import distilled

    sequences, distill_seconds = distilled(target, prompts, new_tokens, list(eos_ids or []), progress)
    train_seqs, held_seqs = split(sequences)
    train_seqs = [s for s in train_seqs if len(hosts_of(s, 0))]
    if not train_seqs:
        raise SpecError("ppd: the model ended every training continuation at once; nothing to learn from")
    frozen = new_draft(target, target.config.num_layers).requires_grad_(False)  # float32, all layers
    torch.manual_seed(seed)
    module = PromptTokens(target.config.hidden_size, m)
    with torch.no_grad():  # start near an average token, each slightly different
        table = frozen.embed.weight
        module.embeds.copy_(table.mean(0) + 0.1 * table.std(0) * torch.randn(m, table.shape[1]))

    def loss_of_batch(generator: torch.Generator) -> torch.Tensor:
        real, positions, slots, mask, labels = prompt_batch(train_seqs, m, batch_tokens, window, generator)
        logits = prompt_logits(frozen, module, real, positions, slots, mask)
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-1)

    report = train(module, loss_of_batch, minutes=minutes, max_steps=max_steps, lr=lr, seed=seed,
                   log_every=5, progress=progress, desc="training ppd")
    settings = {"tokens": m}
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}, "settings": settings,
        "acceptance": acceptance(frozen, module, held_seqs, window), "curve": report.curve, "steps": report.steps,
        "train_seconds": report.seconds, "distill_seconds": distill_seconds, "seed": seed,
        "train_positions": sum(len(hosts_of(s, 0)) for s in train_seqs),
        "held_out_positions": sum(len(hosts_of(s, 0)) for s in held_seqs),
        "model": model_fingerprint(target), "new_tokens": new_tokens, "prompts": len(prompts),
    }
    save_checkpoint(trained_path("ppd", target, settings), payload)
    return payload


def train_command(loaded, args: argparse.Namespace) -> dict[str, Any]:
    """`workbench train ppd`: train, print what came of it, return the report."""
    from workbench.training.heads import training_prompt_ids

    if not 1 <= args.tokens <= 5:
        raise SpecError(f"ppd: --tokens {args.tokens} is out of range; expected 1 to 5 prompt tokens")
    report = train_ppd(loaded.model, training_prompt_ids(loaded, args.prompts, args.seed), args.tokens,
                       minutes=args.minutes, seed=args.seed, new_tokens=args.new_tokens,
                       eos_ids=loaded.eos_token_ids, max_steps=args.max_steps)
    path = trained_path("ppd", loaded.model, report["settings"])
    top1 = ", ".join(f"token {j + 1}: {row[0]:.2f}" for j, row in enumerate(report["acceptance"]))
    print(f"trained {args.tokens} ppd prompt tokens in {report['train_seconds'] / 60:.1f} min "
          f"({report['steps']} steps, data {report['distill_seconds'] / 60:.1f} min, "
          f"{report['train_positions']} positions); final loss {report['curve'][-1][2]:.3f}")
    print(f"held-out top-1 acceptance: {top1}")
    print(f"saved {path}; run it with --decode ppd" + (f":tokens={args.tokens}" if args.tokens != 3 else ""))
    return report
