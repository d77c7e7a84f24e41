"""Read a Hugging Face checkpoint (config.json + safetensors) from a folder or the local hub cache.

This machine never downloads: a hub id loads only if `huggingface_hub` already has it in its cache.
Only safetensors are read; pickled `pytorch_model.bin` files can run code on load, so they are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors.torch import load_file

from workbench.errors import ModelError
from workbench.models.config import ModelConfig

_INDEX = "model.safetensors.index.json"


def valid_sources() -> str:
    """What `load_model` accepts, for error messages."""
    return (
        "valid: 'smollm2-135m' (the embedded default model), a path to a .gguf file, a folder with "
        f"config.json and *.safetensors, or a hub id already in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}; nothing is downloaded)"
    )


def read_hf(path_or_hub_id: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """Read a checkpoint into (config, tensors as stored, the folder it came from).

    Tensors keep the checkpoint's names and dtype; `model_from_hf_state_dict` converts them.
    """
    folder = hf_folder(path_or_hub_id)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder} has no config.json; {valid_sources()}")
    config = ModelConfig.from_hf(json.loads(config_path.read_text()))
    generation = folder / "generation_config.json"  # instruct models often list more end ids here
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        for token in [eos] if isinstance(eos, int) else eos or []:
            if token not in config.eos_token_ids:
                config.eos_token_ids.append(token)
    state: dict[str, torch.Tensor] = {}
    for shard in _safetensors_files(folder):
        state.update(load_file(shard))
    return config, state, folder


def hf_folder(path_or_hub_id: str | Path) -> Path:
    """The checkpoint folder: the path itself, or a hub id's snapshot in the local cache."""
    folder = Path(path_or_hub_id).expanduser()
    return folder if folder.is_dir() else _cached_snapshot(str(path_or_hub_id))


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / _INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelError(f"{folder}: shards listed in {_INDEX} are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelError(
            f"{folder} holds only pickled weights (.bin/.pt), which are not loaded because loading them can "
            "run code; convert them to safetensors (model.save_pretrained(folder, safe_serialization=True))"
        )
    raise ModelError(f"{folder} has no model.safetensors or {_INDEX}; {valid_sources()}")


def _cached_snapshot(hub_id: str) -> Path:
    """The local snapshot folder of a hub id, without touching the network."""
    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, ValueError):
        raise ModelError(
            f"no model {hub_id!r}: not a folder, not a .gguf file and not in the local Hugging Face cache; "
            f"{valid_sources()}"
        ) from None
