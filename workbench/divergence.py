"""Where a run's output departs from what greedy plain decoding would have produced.

The engine records, for every emitted token, the target's own argmax at that position (StepEvent.target_argmax)
beside the target's probability of the token chosen (StepEvent.logprobs). A token departs when it is not the
argmax: plain greedy decoding, given the same text so far, would have picked another token there. Every drafter,
acceptor and sampler gets this for free because the engine's verification forward scores every committed token.

For a lossless technique under greedy decoding there are no departures (float rounding aside: batched
verification in bf16 can flip near-ties). Under sampling, plain decoding departs from the argmax too, so the
count then measures how far from greedy a run went, not a loss. Departures count positions, not a diff of two
texts: after the first departure the prefix differs, and later positions compare with the target's argmax on
this run's own prefix.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.trace import Trace


def departed(event: Any) -> list[bool]:
    """Per token of a step: whether it differs from the target's argmax there (False where not recorded)."""
    argmax = getattr(event, "target_argmax", None) or []
    return [i < len(argmax) and argmax[i] is not None and token != argmax[i] for i, token in enumerate(event.tokens)]


def divergence(trace: Trace) -> dict[str, Any]:
    """departures: tokens that differ from the target's argmax; departure_rate: their share of the output;
    first_departure: the index in the output of the first one (None if none); target_perplexity: exp of the
    mean negative log-probability of the output under the target's (processed) distribution."""
    flags = [d for e in trace.events for d in departed(e)]
    logprobs = [lp for e in trace.events for lp in e.logprobs if lp is not None]
    recorded = any(getattr(e, "target_argmax", None) for e in trace.events)
    return {
        "departures": sum(flags) if recorded else None,
        "departure_rate": sum(flags) / len(flags) if recorded and flags else None,
        "first_departure": flags.index(True) if True in flags else None,
        "target_perplexity": math.exp(-sum(logprobs) / len(logprobs)) if logprobs else None,
    }
