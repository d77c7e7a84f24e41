"""Shared test material: tiny models whose outputs vary, prompts drafters can work with, a failing drafter."""

from dataclasses import dataclass

import torch

from workbench.decoding.base import Drafter, DraftTree
from workbench.models.llama import LlamaModel
from workbench.models.random import random_model
from workbench.registry import register

# Token-id prompts: one that repeats (so copying drafters find something), one random.
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6],
    [int(t) for t in torch.randint(3, 500, (30,), generator=torch.Generator().manual_seed(0))],
]


def varied_model(variant: str = "llama", layers: int = 4, seed: int = 7) -> LlamaModel:
    """A tiny random model with weights scaled up: greedy output varies instead of repeating one token."""
    model = random_model(variant, seed=seed, num_hidden_layers=layers)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model


@register("decoding", "_test_breaks_at_step_3", lossless=True)
@dataclass
class BreaksAtStep3(Drafter):
    """Fails on its third step, to test how failed runs are reported and recorded."""

    def propose(self, state):
        if state.step == 3:
            raise RuntimeError("drafter broke")
        return DraftTree()


# A prompt of the suite's kinds for the embedded model's lossless checks of trained drafters (the tiny-model
# tests cover many prompts; this one checks the real model's path, in float32, where ties cannot flip).
EMBEDDED_PROMPTS = ["Summarise in one sentence: The library opens at nine, closes at six, and is closed on Sundays."]


def assert_output_is_plain_decodings(wb, decode: str, new_tokens: int = 24) -> None:
    """`decode` on the workbench's default model gives plain decoding's tokens, in no more target forwards."""
    for prompt in EMBEDDED_PROMPTS:
        plain = wb.generate(prompt, f"max_new_tokens={new_tokens}")
        ours = wb.generate(prompt, f"max_new_tokens={new_tokens};decode={decode}")
        assert ours.token_ids == plain.token_ids, decode
        assert ours.summary()["target_forwards"] <= plain.summary()["target_forwards"], decode
