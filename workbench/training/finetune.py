"""A short fine-tune of the model on a task built from Python's standard library: the delta that the delta
transforms (compression/delta.py: `finetune`, `dare`, `compeft`, `adapter1bit`) apply and compress.

The task, `docsum`: given a standard-library function's or class's qualified signature, write the first line
of its docstring (`Python: json.dumps(obj, *, skipkeys=False, ...)\\nSummary: Serialize obj to a JSON
formatted str.`). Pairs come from the modules of `corpus.MODULES`; every fourth module (in that list's order)
is held out, so the held-out loss measures the learnt format and style on functions the tune never saw. The
loss is next-token cross-entropy on the summary tokens only.

Two kinds of delta, trained with AdamW under a time budget (`loop.train`) on every linear of some decoder
layers (never the LM head or embeddings):
- `full`: the layers' weights themselves (a dense ΔW per linear, W_ft = W + ΔW);
- `lora`: LoRA (Hu et al., arXiv 2106.09685): W_ft = W + (α/r)·B A with A [r, in] random and B [out, r] zero
  at the start, α = r here;
- `lora1bit`: the same adapter trained quantization-aware for `adapter1bit`, as the 1-bit adapters paper
  trains its adapters: the forward uses each factor's 1-bit form (signs times a mean magnitude per row of A
  and per column of B), the backward passes the gradient straight through to the float factors.
The result is cached like the drafters' checkpoints (`checkpoints.py`), keyed by the model's fingerprint and
the delta's settings (task, mode, rank, layers), together with the held-out losses before and after.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import SpecError
from workbench.training.corpus import MODULES
from workbench.training.loop import train

TASK = "docsum"
MODES = ("full", "lora", "lora1bit")
LORA_MODES = ("lora", "lora1bit")
FULL_LAYERS = 4  # `full` tunes the last this many decoder layers unless told otherwise
LEARNING_RATES = {"full": 1e-4, "lora": 1e-3, "lora1bit": 1e-3}


@dataclass
class Example:
    prompt: str  # "Python: module.name(signature)\nSummary:"
    target: str  # " first line of the docstring\n"


def _summary_pairs(module_name: str) -> list[Example]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a stdlib module missing from this build of Python
        return []
    out = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        with warnings.catch_warnings():  # typing's deprecated submodules warn when their docs are read
            warnings.simplefilter("ignore", DeprecationWarning)
            doc = inspect.getdoc(obj)
        try:
            signature = str(inspect.signature(obj))
        except (TypeError, ValueError):
            continue
        summary = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        if 12 <= len(summary) <= 120 and len(signature) <= 120:
            out.append(Example(f"Python: {module_name}.{name}{signature}\nSummary:", f" {summary}\n"))
    return out


@functools.cache
def task_examples() -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, held-out) examples of the docsum task; every fourth module of corpus.MODULES is held out."""
    train_set, held_out = [], []
    for i, name in enumerate(MODULES):
        (held_out if i % 4 == 3 else train_set).extend(_summary_pairs(name))
    return tuple(train_set), tuple(held_out)


def encode(tokenizer, vocab_size: int, text: str) -> list[int]:
    """Token ids of `text`; a model without a tokenizer (the tiny test models) reads bytes modulo its vocabulary."""
    if tokenizer is None:
        return [b % vocab_size for b in text.encode()]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encoded(examples: Sequence[Example], tokenizer, vocab_size: int) -> list[tuple[torch.Tensor, int]]:
    """Each example as (ids [T], index of the first target token)."""
    out = []
    for ex in examples:
        prompt, target = encode(tokenizer, vocab_size, ex.prompt), encode(tokenizer, vocab_size, ex.target)
        out.append((torch.tensor(prompt + target, dtype=torch.long), len(prompt)))
    return out


def packed_loss(model: nn.Module, items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    """Summed target-token cross-entropy of several examples in one forward, and the target count.

    The examples are packed into one sequence with a block-diagonal causal mask and positions restarting at
    each, so each sees only itself (the same losses as one forward each, at the cost of one larger forward);
    logits are computed for the rows that predict target tokens only."""
    ids = torch.cat([x for x, _ in items]).to(model.device)
    positions = torch.cat([torch.arange(len(x)) for x, _ in items]).to(model.device)
    example = torch.cat([torch.full((len(x),), k) for k, (x, _) in enumerate(items)]).to(model.device)
    mask = (example[:, None] == example[None, :]) & (positions[:, None] >= positions[None, :])
    rows, offset = [], 0  # rows whose next token is a target token
    for x, start in items:
        rows.append(torch.arange(offset + start - 1, offset + len(x) - 1))
        offset += len(x)
    rows = torch.cat(rows).to(model.device)
    hidden = model(ids, positions, mask=mask, final_hidden=True, no_logits=True).final_hidden
    loss = F.cross_entropy(model.logits(hidden[rows]), ids[rows + 1], reduction="sum")
    return loss, len(rows)


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: Sequence[tuple[torch.Tensor, int]], pack: int = 16) -> float:
    """Mean target-token cross-entropy over the held-out examples (`pack` to a forward)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), pack):
        loss, n = packed_loss(model, examples[i:i + pack])
        total, count = total + float(loss), count + n
    return total / count


def sign_ste(w: torch.Tensor, dim: int) -> torch.Tensor:
    """w's 1-bit form, sign(w) times the mean magnitude along `dim` (per row of A, per column of B: what
    `adapter1bit` stores), with a straight-through gradient to w."""
    quantized = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=dim, keepdim=True)
    return w + (quantized - w).detach()


class TunedLinear(nn.Module):
    """A frozen linear plus a trainable delta: base(x) + x ΔWᵀ (`full`) or base(x) + (α/r)·B(Ax) (`lora`;
    `lora1bit` runs the factors in their 1-bit form in the forward, straight-through in the backward)."""

    def __init__(self, base: nn.Linear, mode: str, rank: int, generator: torch.Generator):
        super().__init__()
        self.base, self.mode = base, mode
        out_features, in_features = base.weight.shape
        if mode in LORA_MODES:
            # LoRA's initialisation: A random (Kaiming-uniform scale), B zero, so training starts at the base model
            bound = 1 / math.sqrt(in_features)
            self.a = nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
            self.b = nn.Parameter(torch.zeros(out_features, rank))
            self.scale = 1.0  # α / r with α = r
        else:
            self.delta = nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in LORA_MODES:
            a, b = (sign_ste(self.a, 1), sign_ste(self.b, 0)) if self.mode == "lora1bit" else (self.a, self.b)
            return self.base(x) + F.linear(F.linear(x, a), b) * self.scale
        return self.base(x) + F.linear(x, self.delta)

    def entry(self) -> dict[str, Any]:
        """What the checkpoint keeps for this linear (float32, on the CPU)."""
        if self.mode in LORA_MODES:
            return {"a": self.a.detach().cpu().clone(), "b": self.b.detach().cpu().clone(), "scale": self.scale}
        return {"delta": self.delta.detach().cpu().clone()}


def resolve_layers(mode: str, layers: str, n_layers: int) -> str:
    """`auto` -> the last FULL_LAYERS decoder layers for `full`, every layer for `lora`."""
    if layers != "auto":
        return layers
    if mode in LORA_MODES:
        return "all"
    first = max(0, n_layers - FULL_LAYERS)
    return f"{first}-{n_layers - 1}"


def finetune_settings(mode: str, rank: int, layers: str, n_layers: int) -> dict[str, Any]:
    """The checkpoint key of a fine-tune (the rank only matters to `lora`)."""
    if mode not in MODES:
        raise SpecError(f"fine-tune: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if mode in LORA_MODES and not 1 <= rank <= 256:
        raise SpecError(f"fine-tune: rank {rank} is out of range; expected 1 to 256")
    return {"task": TASK, "mode": mode, "rank": rank if mode in LORA_MODES else 0,
            "layers": resolve_layers(mode, layers, n_layers)}


def finetune_path(model: nn.Module, settings: dict[str, Any], embedding: torch.Tensor | None = None) -> Path:
    """Where the fine-tune of `settings` for this model is cached. The key hashes the model's embedding rounded
    to bfloat16, so a fine-tune made in float32 applies to the same model loaded in bfloat16 (`embedding`: the
    embedding matrix, when the model no longer holds it, e.g. after a compressed tied LM head replaced it)."""
    from workbench.training.checkpoints import checkpoint_path, fingerprint_of

    weight = model.embed.weight if embedding is None else embedding
    return checkpoint_path("finetune", model, settings, fingerprint_of(model.config, weight.to(torch.bfloat16)))


def finetune(model: nn.Module, tokenizer, settings: dict[str, Any], *, minutes: float, max_steps: int = 2000,
             batch: int = 8, lr: float | None = None, seed: int = 0, heldout_examples: int = 200,
             progress: bool = True) -> dict[str, Any]:
    """Train the delta `settings` describes on the docsum task; returns the checkpoint payload (settings, the
    delta per linear site, and a report with the held-out losses before and after). The model is left as it came."""
    from workbench.compression.base import linear_sites, parse_layers, selects

    if minutes <= 0 or max_steps < 1 or batch < 1:
        raise SpecError("fine-tune: --minutes must be positive, --max-steps and --batch at least 1")
    vocab = model.config.vocab_size
    train_set, held_out = task_examples()
    train_ids = encoded(train_set, tokenizer, vocab)
    held_ids = encoded(held_out[:heldout_examples], tokenizer, vocab)
    chosen = parse_layers(settings["layers"], len(model.layers))
    sites = [s for s in linear_sites(model, head=False) if selects(chosen, s.name)]
    if any(not isinstance(s.module, nn.Linear) for s in sites):
        raise SpecError("fine-tune: the model's linears must be plain (load it in float32, uncompressed)")
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    base_loss = heldout_loss(model, held_ids)
    generator = torch.Generator().manual_seed(seed)
    tuned = [TunedLinear(s.module, settings["mode"], settings["rank"], generator).to(model.device) for s in sites]
    for site, module in zip(sites, tuned):
        setattr(site.parent, site.attr, module)

    def loss_of_batch(g: torch.Generator) -> torch.Tensor:
        picks = torch.randint(0, len(train_ids), (batch,), generator=g).tolist()
        loss, n = packed_loss(model, [train_ids[i] for i in picks])
        return loss / n

    try:
        report = train(model, loss_of_batch, minutes=minutes, max_steps=max_steps,
                       lr=lr or LEARNING_RATES[settings["mode"]], seed=seed, progress=progress,
                       desc=f"fine-tuning ({settings['mode']})")
        model.eval()
        tuned_loss = heldout_loss(model, held_ids)
        deltas = {site.name: module.entry() for site, module in zip(sites, tuned)}
    finally:
        for site in sites:
            setattr(site.parent, site.attr, site.module)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return {"settings": settings, "deltas": deltas,
            "report": {"base_loss": base_loss, "tuned_loss": tuned_loss, "steps": report.steps,
                       "train_seconds": report.seconds, "seconds": time.perf_counter() - start,
                       "train_examples": len(train_ids), "heldout_examples": len(held_ids),
                       "curve": report.curve}}
