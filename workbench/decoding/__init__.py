"""Decoding techniques: drafters (what to propose) and acceptors (what the target keeps).

Importing this package registers every technique in it.
"""

from workbench.decoding import (  # noqa: F401  (registration)
    adadec,
    adaptive,
    astar,
    clover,
    decided,
    draft_model,
    dyspec,
    early_exit,
    entropy_adaptive,
    falcon,
    fastdraft,
    hydra,
    judge,
    kangaroo,
    layer_skip,
    lexical_unit,
    longspec,
    lookahead,
    match,
    medusa,
    monitor,
    plain,
    ppd,
    prompt_lookup,
    rsd,
    speculative,
    superposed,
    token_recycling,
    triforce,
    typical,
)
