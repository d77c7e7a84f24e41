"""Tokenizers come from transformers, for Hugging Face folders and GGUF files alike.

A GGUF file carries its vocabulary, merges, special ids and chat template in its metadata; transformers
rebuilds a fast tokenizer from them (`gguf_file=`), so both kinds of model get the same tokenizer type.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from workbench.errors import ModelError

# Any of these in a folder means it ships a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a checkpoint folder ships tokenizer files (bare `save_pretrained` outputs do not)."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder or a .gguf file, read from local files only."""
    source = Path(source).expanduser()
    try:
        if source.suffix == ".gguf" and source.is_file():
            return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
        if source.is_dir() and has_tokenizer(source):
            return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the tokenizer of {source}: {e}") from None
    raise ModelError(
        f"no tokenizer at {source}; valid: a .gguf file with tokenizer metadata, or a folder with one of "
        f"{', '.join(_TOKENIZER_FILES)}"
    )
