"""Self-distilled training data: the target's own greedy continuations and its last-layer states.

Each prompt is continued greedily by the target (plain decoding through the engine), then the whole
sequence runs once more through the model to record the last layer's output at every position. Drafters
learn to predict the tokens after position t from the state at t; from the prompt's last token on, those
tokens are the target's own choices, which is what a drafter must guess (Medusa-2's self-distillation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from workbench.engine import Engine
from workbench.spec import RunSpec, TechniqueSpec


@dataclass
class Sequence:
    tokens: torch.Tensor  # [T] prompt and continuation ids
    hidden: torch.Tensor  # [T, hidden] float32, the last layer's output before the final norm
    start: int  # first position whose next token is the target's own choice (the prompt's last token)


@torch.inference_mode()
def distill(model, prompts: list[list[int]], new_tokens: int, eos_ids: list[int] | None = None,
            progress: bool = True) -> list[Sequence]:
    """Continue every prompt greedily for up to `new_tokens` tokens and record the states."""
    spec = RunSpec(decode=TechniqueSpec("plain"), max_new_tokens=new_tokens).validated()
    out = []
    for ids in tqdm(prompts, desc="self-distilling", unit="prompt", disable=not progress):
        engine = Engine(model, spec, list(eos_ids or []), lambda _ids: "")
        generated = [t for event in engine.run(ids) for t in event.tokens]
        tokens = torch.tensor(ids + generated, device=model.device)
        positions = torch.arange(len(tokens), device=model.device)
        hidden = model(tokens, positions, None, last_only=True, final_hidden=True).final_hidden
        out.append(Sequence(tokens.cpu(), hidden.float().cpu(), len(ids) - 1))
    return out


def split(sequences: list[Sequence], held_out: float = 0.1) -> tuple[list[Sequence], list[Sequence]]:
    """Train and held-out sequences (the last `held_out` fraction is held out; at least one of each)."""
    n = max(1, min(len(sequences) - 1, round(len(sequences) * held_out)))
    return sequences[:-n], sequences[-n:]
