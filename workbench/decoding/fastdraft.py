"""FastDraft: a small draft model trained on the target's own outputs, used for speculative decoding.

Paper: Zafrir et al., "FastDraft: How to Train Your Draft" (arXiv 2411.11055). A draft model with the
target's vocabulary is pre-trained on text and then aligned to the target by knowledge distillation on
data the target generated itself (sequence-level distillation: the target's continuations are the labels),
which is what makes its guesses the target's. Here the draft is a Llama with the target's configuration cut
to `layers` layers. It shares the target's token embedding, final norm weights' shape and LM head (frozen,
never copied at decoding time), and its layers start from the target's first `layers` (the early exit that
draft_model's `draft=self` drafts with, untrained). Training (`workbench train fastdraft`)
fits the layers and the final norm to the target's greedy continuations of the standard-library prompts
(the same self-distilled data as the draft heads, workbench/training/distill.py), several sequences packed per
step under a block-diagonal causal mask. Decoding hands the trained model to the draft-model speculative
drafter (draft_model.py): it drafts `k` tokens per step with its own KV cache and the target verifies them
with lossless speculative sampling (exact matching under greedy decoding).

Left out: the pre-training phase on a large corpus (the layers start from the target's instead), soft-label
distillation from the target's full distribution (the labels are the target's chosen tokens), and a draft
vocabulary or architecture of its own (it is the target's, shortened).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from workbench.decoding.base import Drafter, DraftTree
from workbench.decoding.draft_model import DraftModel
from workbench.errors import SpecError
from workbench.models.llama import LlamaModel
from workbench.models.packed_linear import PackedLinear, pack_linears
from workbench.registry import param, register
from workbench.training.checkpoints import load_checkpoint, model_fingerprint, save_checkpoint, trained_path
from workbench.training.loop import train

if TYPE_CHECKING:  # distill imports the engine, which imports the drafters
    from workbench.training.distill import Sequence


def new_draft(target: LlamaModel, layers: int) -> LlamaModel:
    """A float32 draft of `layers` layers: the target's first `layers` layers, its final norm, and its embedding
    and LM head (frozen copies in float32, for training): before training it is the target's early exit."""
    draft = LlamaModel(dataclasses.replace(target.config, num_layers=layers)).float()
    with torch.no_grad():
        for mine, theirs in zip(draft.layers, range(layers)):
            for name, p in mine.named_parameters():  # `.weight` of a packed bf16 linear gives the dense weight
                module, _, attr = name.rpartition(".")
                source = target.layers[theirs].get_submodule(module) if module else target.layers[theirs]
                p.copy_(getattr(source, attr).float())
        draft.norm.copy_(target.norm.float())
    draft.embed.weight = torch.nn.Parameter(target.embed.weight.detach().float(), requires_grad=False)
    draft.lm_head.weight = (draft.embed.weight if target.config.tie_word_embeddings else
                            torch.nn.Parameter(target.lm_head.weight.detach().float(), requires_grad=False))
    return draft


def trained_state(draft: LlamaModel) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the draft's own layers and final norm (the embedding and head are the target's)."""
    return {k: v.detach().cpu() for k, v in draft.state_dict().items() if not k.startswith(("embed.", "lm_head."))}


def load_draft(target: LlamaModel, layers: int, state_dict: dict[str, torch.Tensor]) -> LlamaModel:
    """The trained draft in the target's dtype and device, its linears packed where the target's are, sharing
    the target's embedding and LM head modules (no copy)."""
    draft = LlamaModel(dataclasses.replace(target.config, num_layers=layers))
    draft.load_state_dict(state_dict, strict=False)
    draft.to(device=target.device, dtype=target.dtype).eval().requires_grad_(False)
    if any(isinstance(m, PackedLinear) for m in target.layers.modules()):
        pack_linears(draft.layers)
    draft.embed, draft.lm_head = target.embed, target.lm_head
    return draft


def packed_batch(sequences: list[Sequence], tokens: int, window: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random sequences' last `window` tokens packed up to `tokens` tokens: ids, positions, the block-diagonal
    causal mask, and the labels (the next token where it is the target's own choice, else -1)."""
    ids, positions, labels, blocks = [], [], [], []
    while sum(blocks) < tokens:
        seq = sequences[int(torch.randint(len(sequences), (1,), generator=generator))]
        first = max(0, len(seq.tokens) - window)
        ids.append(seq.tokens[first:])
        positions.append(torch.arange(first, len(seq.tokens)))
        nxt = torch.cat([seq.tokens[first + 1:], torch.tensor([-1])])
        nxt[: max(0, seq.start - first)] = -1  # the prompt's next tokens are not the target's choices
        labels.append(nxt)
        blocks.append(len(seq.tokens) - first)
    mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool).tril() for n in blocks])
    return torch.cat(ids), torch.cat(positions), mask, torch.cat(labels)


def draft_loss(draft: LlamaModel, ids, positions, mask, labels) -> torch.Tensor:
    rows = (labels >= 0).nonzero().squeeze(1)
    final = draft(ids, positions, None, mask, last_only=True, final_hidden=True).final_hidden
    return torch.nn.functional.cross_entropy(draft.logits(final[rows]), labels[rows])


@torch.no_grad()
def agreement(draft: LlamaModel, sequences: list[Sequence], width: int = 8) -> list[float]:
    """acc[i]: how often the draft's i-th ranked guess is the target's next token, on held-out sequences."""
    hits, count = torch.zeros(width), 0
    for seq in sequences:
        positions = torch.arange(len(seq.tokens))
        final = draft(seq.tokens, positions, None, None, last_only=True, final_hidden=True).final_hidden
        rows = torch.arange(seq.start, len(seq.tokens) - 1)
        ranked = draft.logits(final[rows]).topk(width, dim=-1).indices
        hits += (ranked == seq.tokens[rows + 1][:, None]).sum(0).float()
        count += len(rows)
    return (hits / max(count, 1)).tolist()


def train_fastdraft(target: LlamaModel, prompts: list[list[int]], layers: int, *, minutes: float, seed: int = 0,
                    new_tokens: int = 128, eos_ids: list[int] | None = None, max_steps: int = 4000,
                    batch_tokens: int = 384, window: int = 192, lr: float = 1e-3,
                    progress: bool = True) -> dict[str, Any]:
    """Train a `layers`-layer draft on the target's own continuations of `prompts` and save its checkpoint."""
    from workbench.training.distill import split
    from workbench.training.heads import distilled

    if not 1 <= layers < target.config.num_layers:
        raise SpecError(f"fastdraft: layers={layers} must be at least 1 and fewer than the target's "
                        f"{target.config.num_layers}")
    sequences, distill_seconds = distilled(target, prompts, new_tokens, list(eos_ids or []), progress)
    train_seqs, held_seqs = split(sequences)
    train_seqs = [s for s in train_seqs if len(s.tokens) - 1 > s.start]  # a batch always has a label
    if not train_seqs:
        raise SpecError("fastdraft: the model ended every training continuation at once; nothing to learn from")
    torch.manual_seed(seed)
    draft = new_draft(target, layers)
    before = agreement(draft.eval(), held_seqs)

    def loss_of_batch(generator: torch.Generator) -> torch.Tensor:
        return draft_loss(draft, *packed_batch(train_seqs, batch_tokens, window, generator))

    report = train(draft, loss_of_batch, minutes=minutes, max_steps=max_steps, lr=lr, seed=seed,
                   progress=progress, desc="training fastdraft")
    settings = {"layers": layers}
    payload = {
        "state_dict": trained_state(draft), "settings": settings, "acceptance": [agreement(draft, held_seqs)],
        "acceptance_before": [before], "curve": report.curve, "steps": report.steps, "seed": seed,
        "train_seconds": report.seconds, "distill_seconds": distill_seconds, "model": model_fingerprint(target),
        "train_positions": sum(len(s.tokens) - 1 - s.start for s in train_seqs),
        "held_out_positions": sum(len(s.tokens) - 1 - s.start for s in held_seqs),
        "new_tokens": new_tokens, "prompts": len(prompts),
    }
    save_checkpoint(trained_path("fastdraft", target, settings), payload)
    return payload


def train_command(loaded, args: argparse.Namespace) -> dict[str, Any]:
    """`workbench train fastdraft`: train, print what came of it, return the report."""
    from workbench.training.heads import training_prompt_ids

    report = train_fastdraft(loaded.model, training_prompt_ids(loaded, args.prompts, args.seed), args.layers,
                             minutes=args.minutes, seed=args.seed, new_tokens=args.new_tokens,
                             eos_ids=loaded.eos_token_ids, max_steps=args.max_steps)
    path = trained_path("fastdraft", loaded.model, report["settings"])
    print(f"trained fastdraft ({args.layers} layers) in {report['train_seconds'] / 60:.1f} min "
          f"({report['steps']} steps, data {report['distill_seconds'] / 60:.1f} min, "
          f"{report['train_positions']} positions); final loss {report['curve'][-1][2]:.3f}")
    print(f"held-out top-1 agreement with the target: {report['acceptance'][0][0]:.2f} "
          f"(before training {report['acceptance_before'][0][0]:.2f})")
    print(f"saved {path}; run it with --decode fastdraft" + (f":layers={args.layers}" if args.layers != 2 else ""))
    return report


@register("decoding", "fastdraft", lossless=True)
@dataclass
class FastDraft(Drafter):
    """Speculative decoding with a small draft model trained on the target's outputs (`workbench train
    fastdraft`); verified losslessly."""

    default_acceptor = "speculative"
    draft_distribution = True  # every tree carries its draft distribution q
    # Needs a checkpoint trained for the model: tests/test_fastdraft.py trains one per test model.
    needs_training = True
    k: int = param(4, "tokens drafted per step", min=1, max=32)
    layers: int = param(2, "layers of the trained draft model; must match a trained checkpoint", min=1, max=64)
    _inner: DraftModel | None = field(init=False, default=None, repr=False)

    def begin(self, state) -> None:
        path = trained_path("fastdraft", state.model, {"layers": self.layers})
        key = f"fastdraft:{path.name}:{state.model.dtype}"  # loaded once per model
        if key not in state.memory:
            payload = load_checkpoint(path)
            if payload is None:
                raise SpecError(f"no trained fastdraft draft model for this model with layers={self.layers}; train "
                                f"one with `workbench train fastdraft --layers {self.layers} --model <the same "
                                f"model>` (minutes on a CPU), then run again")
            state.memory[key] = load_draft(state.model, self.layers, payload["state_dict"])
        self._inner = DraftModel(k=self.k)
        self._inner.given_model = state.memory[key]
        self._inner.begin(state)

    def propose(self, state) -> DraftTree:
        return self._inner.propose(state)

    def observe(self, state, tree, acceptance, logits) -> None:
        self._inner.observe(state, tree, acceptance, logits)
