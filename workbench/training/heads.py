"""Training draft heads (medusa, hydra) on self-distilled data, and measuring their held-out acceptance.

The pipeline: prompts from the standard library (corpus) -> the target's own continuations and states
(distill, cached per model and settings, so the kinds of heads share one pass) -> the heads trained under a
time budget (loop) -> each head's top-k acceptance on held-out sequences -> a checkpoint the drafter loads.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from workbench.engine import Engine
from workbench.spec import RunSpec, TechniqueSpec
from workbench.training.checkpoints import (
    checkpoint_path,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
    trained_path,
)
from workbench.training.corpus import training_prompts
from workbench.training.distill import Sequence, distill, split
from workbench.training.loop import train


@dataclass
class Positions:
    """Every usable position of some sequences: its normed state and the tokens that follow it."""

    hidden: torch.Tensor  # [N, hidden] float32, after the target's final norm
    following: torch.Tensor  # [N, depth + 1] the tokens at t+1 .. t+1+depth, -1 past the sequence's end

    @classmethod
    @torch.no_grad()
    def of(cls, sequences: list[Sequence], model, depth: int) -> Positions:
        from workbench.decoding.draft_heads import final_norm

        hidden, following = [], []
        for seq in sequences:
            t = torch.arange(seq.start, len(seq.tokens) - 1)
            if not len(t):
                continue
            offsets = t[:, None] + 1 + torch.arange(depth + 1)
            padded = torch.cat([seq.tokens, torch.full((depth + 1,), -1, dtype=seq.tokens.dtype)])
            hidden.append(final_norm(model, seq.hidden[t]).clone())  # a plain tensor: trainable on
            following.append(padded[offsets])
        return cls(torch.cat(hidden), torch.cat(following))

    def __len__(self) -> int:
        return len(self.hidden)

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(len(self.hidden), (size,), generator=generator)
        return self.hidden[rows], self.following[rows]

    def chunks(self, rows: int):
        """Every position once, `rows` at a time: (inputs, following) pairs for evaluation."""
        for start in range(0, len(self.hidden), rows):
            yield self.hidden[start:start + rows], self.following[start:start + rows]


@dataclass
class Contexts:
    """Whole sequences, for drafters that attend over the context (clover, kangaroo): each sequence's states
    at every position, and its usable positions with the tokens that follow them (as in `Positions`)."""

    states: list[torch.Tensor]  # per sequence [T, hidden] float32: what the drafter reads at every position
    positions: list[torch.Tensor]  # per sequence, the usable positions t (from the prompt's last token on)
    following: list[torch.Tensor]  # per sequence [P, depth + 1] the tokens at t+1 .. t+1+depth, -1 past the end
    # positions a training batch draws from each of its sequences: the context attention runs over whole
    # sequences, which costs more than the heads on the positions, so a batch of 64 reads one long sequence
    per_sequence: int = 64

    @classmethod
    @torch.no_grad()
    def of(cls, sequences: list[Sequence], model, depth: int, states) -> Contexts:
        """`states(seq)` gives what the drafter reads at each of the sequence's positions."""
        out = cls([], [], [])
        for seq in sequences:
            t = torch.arange(seq.start, len(seq.tokens) - 1)
            if not len(t):
                continue
            padded = torch.cat([seq.tokens, torch.full((depth + 1,), -1, dtype=seq.tokens.dtype)])
            out.states.append(states(seq).float().clone())
            out.positions.append(t)
            out.following.append(padded[t[:, None] + 1 + torch.arange(depth + 1)])
        return out

    def __len__(self) -> int:
        return sum(len(t) for t in self.positions)

    def batch(self, size: int, generator: torch.Generator) -> tuple[list, torch.Tensor]:
        """`size` positions, up to `per_sequence` distinct ones from each of random sequences:
        ([(states, t)], following)."""
        inputs, following, drawn = [], [], 0
        while drawn < size:
            s = int(torch.randint(len(self.states), (1,), generator=generator))
            count = min(self.per_sequence, len(self.positions[s]), size - drawn)
            rows = torch.randperm(len(self.positions[s]), generator=generator)[:count]
            inputs.append((self.states[s], self.positions[s][rows]))
            following.append(self.following[s][rows])
            drawn += count
        return inputs, torch.cat(following)

    def chunks(self, rows: int):
        """Every position once, a sequence's `rows` at a time."""
        for states, t, following in zip(self.states, self.positions, self.following):
            for start in range(0, len(t), rows):
                yield [(states, t[start:start + rows])], following[start:start + rows]


def training_prompt_ids(loaded, count: int, seed: int = 0, reply_tokens: int = 64,
                        progress: bool = True) -> list[list[int]]:
    """Training prompts as token ids: the corpus's chats through the chat template, each earlier assistant turn
    of a multi-turn chat being the target's own greedy reply (up to `reply_tokens` tokens); a model without a
    tokenizer (the tiny test models) gets random ids instead."""
    if loaded.tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        vocab = loaded.config.vocab_size
        return [torch.randint(vocab, (16,), generator=generator).tolist() for _ in range(count)]
    tokenizer = loaded.tokenizer

    def ids_of(messages: list[dict[str, str]]) -> list[int]:
        chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(chat, add_special_tokens=False)["input_ids"][-1024:]

    spec = RunSpec(decode=TechniqueSpec("plain"), max_new_tokens=reply_tokens).validated()
    out = []
    for prompt in tqdm(training_prompts(count, seed), desc="building prompts", unit="prompt", disable=not progress):
        messages: list[dict[str, str]] = []
        for role, content in prompt.messages:
            if content is None:  # the target's own reply to the chat so far
                engine = Engine(loaded.model, spec, list(loaded.eos_token_ids or []), lambda _ids: "")
                reply = [t for event in engine.run(ids_of(messages)) for t in event.tokens]
                content = tokenizer.decode(reply, skip_special_tokens=True).strip()
            messages.append({"role": role, "content": content})
        out.append(ids_of(messages))
    return out


def distilled(model, prompts: list[list[int]], new_tokens: int, eos_ids: list[int],
              progress: bool) -> tuple[list[Sequence], float]:
    """The self-distilled sequences (cached next to the model) and the seconds it took to make them."""
    settings = {"prompts": hashlib.sha256(repr(prompts).encode()).hexdigest()[:16], "new_tokens": new_tokens,
                "eos": sorted(eos_ids)}
    path = checkpoint_path("distilled", model, settings)
    cached = load_checkpoint(path)
    if cached is not None:
        return [Sequence(**s) for s in cached["sequences"]], cached["seconds"]
    start = time.perf_counter()
    sequences = distill(model, prompts, new_tokens, eos_ids, progress)
    seconds = time.perf_counter() - start
    save_checkpoint(path, {"sequences": [vars(s) for s in sequences], "seconds": seconds})
    return sequences, seconds


@torch.no_grad()
def topk_acceptance(drafter_cls, module, model, data: Positions, settings: dict[str, Any], width: int,
                    rows: int = 512) -> list[list[float]]:
    """acc[d][i]: how often head d+1's i-th ranked guess is the target's token, over held-out positions."""
    depth = drafter_cls.depth(settings)
    hits = torch.zeros(depth, width)
    counts = torch.zeros(depth)
    for inputs, following in data.chunks(rows):
        logits = drafter_cls.head_logits(module, model, inputs, following)  # [B, heads, vocab]
        ranked = logits.topk(width, dim=-1).indices
        target = following[:, 1:depth + 1]
        valid = target >= 0
        hits += ((ranked == target[..., None]) & valid[..., None]).sum(0).float()
        counts += valid.sum(0).float()
    return (hits / counts.clamp_min(1)[:, None]).tolist()


def continuations(sequences: list[Sequence]) -> torch.Tensor:
    """The target's own tokens of the sequences (after each prompt): what drafters guess."""
    return torch.cat([seq.tokens[seq.start + 1:] for seq in sequences])


def token_counts(sequences: list[Sequence], vocab_size: int) -> torch.Tensor:
    """How often the target produced each token in the sequences' continuations (the draft vocabulary's ranking,
    `draft_heads.HeadDrafter.vocab`)."""
    return torch.bincount(continuations(sequences), minlength=vocab_size).to(torch.int32)


def vocab_coverage(counts: torch.Tensor, held_out: list[Sequence],
                   sizes: tuple[int, ...] = (2048, 4096, 8192, 16384)) -> dict[int, float]:
    """The share of the held-out continuations' tokens inside the `size` most frequent training tokens: the
    most a draft vocabulary of that size lets the heads guess."""
    tokens = continuations(held_out)
    ranked = counts.float().argsort(descending=True)
    out = {}
    for size in sizes:
        inside = torch.zeros(len(counts), dtype=torch.bool)
        inside[ranked[:size]] = True
        out[size] = round(inside[tokens].float().mean().item(), 4)
    return out


def train_heads(drafter_cls, model, prompts: list[list[int]], settings: dict[str, Any], *, minutes: float,
                seed: int = 0, new_tokens: int = 128, eos_ids: list[int] | None = None, batch: int = 64,
                max_steps: int = 4000, lr: float = 1e-3, width: int = 8, progress: bool = True) -> dict[str, Any]:
    """Train `drafter_cls`'s heads for `model` on its own continuations of `prompts` (token ids) and save the
    checkpoint the drafter loads; returns what was saved (loss curve, held-out acceptance, timings)."""
    sequences, distill_seconds = distilled(model, prompts, new_tokens, list(eos_ids or []), progress)
    train_seqs, held_seqs = split(sequences)
    depth = drafter_cls.depth(settings)
    data = drafter_cls.training_data(train_seqs, model, settings)
    held = drafter_cls.training_data(held_seqs, model, settings)
    torch.manual_seed(seed)
    module = drafter_cls.new_module(model, settings)

    def loss_of_batch(generator: torch.Generator) -> torch.Tensor:
        inputs, following = data.batch(batch, generator)
        logits = drafter_cls.head_logits(module, model, inputs, following)
        target = following[:, 1:depth + 1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1)

    report = train(module, loss_of_batch, minutes=minutes, max_steps=max_steps, lr=lr, seed=seed,
                   progress=progress, desc=f"training {drafter_cls.kind}")
    acc = topk_acceptance(drafter_cls, module, model, held, settings, width)
    counts = token_counts(train_seqs, model.config.vocab_size)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "token_counts": counts, "vocab_coverage": vocab_coverage(counts, held_seqs),
        "settings": settings, "acceptance": acc, "curve": report.curve, "steps": report.steps,
        "train_seconds": report.seconds, "distill_seconds": distill_seconds, "seed": seed,
        "train_positions": len(data), "held_out_positions": len(held),
        "model": model_fingerprint(model), "new_tokens": new_tokens, "prompts": len(prompts),
    }
    save_checkpoint(trained_path(drafter_cls.kind, model, settings), payload)
    return payload
