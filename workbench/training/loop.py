"""A training loop under a time budget, with a progress bar, a seed and a recorded loss curve."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


@dataclass
class TrainReport:
    steps: int = 0
    seconds: float = 0.0
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, seconds, mean loss since last)


def train(module: torch.nn.Module, loss_of_batch: Callable[[torch.Generator], torch.Tensor], *, minutes: float,
          max_steps: int, lr: float = 1e-3, seed: int = 0, log_every: int = 10, progress: bool = True,
          desc: str = "training") -> TrainReport:
    """AdamW on `module`'s parameters until `max_steps` or `minutes` run out, whichever comes first.

    `loss_of_batch(generator)` draws a batch with the generator (seeded from `seed`, so a run repeats) and
    returns its loss. The learning rate decays linearly to a tenth over the planned steps."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - 0.9 * min(step / max_steps, 1))
    report = TrainReport()
    start = time.perf_counter()
    running, count = 0.0, 0
    module.train()
    with tqdm(total=max_steps, desc=desc, unit="step", disable=not progress) as bar:
        while report.steps < max_steps and time.perf_counter() - start < minutes * 60:
            loss = loss_of_batch(generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            report.steps += 1
            running, count = running + loss.item(), count + 1
            if report.steps % log_every == 0 or report.steps == max_steps:
                report.curve.append((report.steps, round(time.perf_counter() - start, 2), running / count))
                bar.set_postfix(loss=f"{running / count:.3f}")
                running, count = 0.0, 0
            bar.update(1)
    if count:
        report.curve.append((report.steps, round(time.perf_counter() - start, 2), running / count))
    module.eval()
    report.seconds = time.perf_counter() - start
    return report
