"""Trained drafters' checkpoints in the workbench cache, next to the converted models.

A checkpoint's name hashes the model it was trained on (its configuration and token embeddings, which no
weight transform changes) and the drafter's settings, so a drafter never loads heads trained for another
model or shape. Writes go to a temporary file that is renamed into place: a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from workbench.models.embedded import cache_root


def model_fingerprint(model: torch.nn.Module) -> str:
    """12 hex digits identifying a model: its configuration and its embedding matrix (rounded to bfloat16)."""
    cached = getattr(model, "_workbench_fingerprint", None)
    if cached:
        return cached
    fingerprint = fingerprint_of(model.config, model.embed.weight)
    model._workbench_fingerprint = fingerprint  # the embedding is never modified in place
    return fingerprint


def fingerprint_of(config: object, embedding: torch.Tensor) -> str:
    """`model_fingerprint` from a configuration and the token embedding matrix [vocab, hidden] (for callers
    holding the embedding apart from the model, e.g. after a compressed LM head replaced a tied one)."""
    digest = hashlib.sha256(repr(config).encode())
    # the values rounded to bfloat16: the same model loaded in bfloat16 or in float32 (from the same file) is
    # the same model, so a checkpoint trained in one dtype is found in the other
    rounded = embedding.detach().to(torch.bfloat16).float().contiguous()
    digest.update(rounded.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def checkpoint_path(kind: str, model: torch.nn.Module, settings: dict[str, Any], fingerprint: str | None = None,
                    ) -> Path:
    """Where `kind`'s checkpoint for this model (or the model of `fingerprint`) and these settings lives."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return cache_root() / "drafters" / f"{kind}-{fingerprint or model_fingerprint(model)}-{key}.pt"


def trained_path(kind: str, model: torch.nn.Module, settings: dict[str, Any]) -> Path:
    """`checkpoint_path` of something trained on the corpus's prompts (drafters, the judge): keyed by the corpus's
    version too, so one trained on other prompts is never loaded silently."""
    from workbench.training.corpus import CORPUS_VERSION

    return checkpoint_path(kind, model, {**settings, "corpus": CORPUS_VERSION})


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The payload, or None when there is no checkpoint."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
