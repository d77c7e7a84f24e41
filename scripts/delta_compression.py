"""Delta compression against the fine-tune it compresses: held-out task loss and the delta's real bytes.

    .venv/bin/python scripts/delta_compression.py --minutes 5

Makes the cached fine-tunes first where they are missing (`workbench finetune --mode full`, `lora` and
`lora1bit`, each --minutes), then, in one process, scores the base model, each fine-tune as it is and every compressed
delta in SPECS on the docsum task's held-out split (training/finetune.py): mean target-token loss. Gain kept =
(base loss − loss) / (base loss − the uncompressed fine-tune's loss), from the same run; bytes = the deltas as
stored over the uncompressed delta (dense ΔW for `full`, both LoRA factors for the LoRA modes), in the model's
dtype. `--split train` scores as many training examples instead, for choosing parameters (ComPEFT's alpha).
Writes docs/results/delta_compression.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import time

from workbench.compression.base import apply_compression
from workbench.compression.delta import delta_bytes
from workbench.models import load_model
from workbench.spec import TechniqueSpec
from workbench.training.checkpoints import load_checkpoint, save_checkpoint
from workbench.training.finetune import encoded, finetune, finetune_path, finetune_settings, heldout_loss, task_examples

# (spec, the uncompressed fine-tune it is measured against)
SPECS = ["dare:p=0.9", "dare:p=0.95", "compeft:density=0.1", "compeft:density=0.1,alpha=5", "adapter1bit",
         "adapter1bit:tune=lora", "adapter1bit:tune=lora,fit=product"]
BAR_GAIN, BAR_BYTES = 0.95, 0.10


def reference(spec: str) -> str:
    """The uncompressed fine-tune a compressed delta is measured against: the full-precision LoRA fine-tune for
    LoRA deltas (also for adapter1bit's quantization-aware one: the gain a full-precision adapter reaches)."""
    return "finetune:tune=lora" if "adapter1bit" in spec or "tune=lora" in spec else "finetune"


def ensure_finetune(model_name: str, mode: str, minutes: float, max_steps: int) -> dict:
    """The cached fine-tune's report, training it first if there is none."""
    loaded = load_model(model_name, "float32")
    settings = finetune_settings(mode, 16, "auto", len(loaded.model.layers))
    path = finetune_path(loaded.model, settings)
    payload = load_checkpoint(path)
    if payload is None:
        payload = finetune(loaded.model, loaded.tokenizer, settings, minutes=minutes, max_steps=max_steps)
        save_checkpoint(path, payload)
    return {"settings": settings, **{k: v for k, v in payload["report"].items() if k != "curve"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--minutes", type=float, default=5.0, help="budget of each missing fine-tune")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--specs", nargs="*", default=SPECS, help="compressed deltas to score")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="score on the held-out split, or on as many training examples (to choose parameters)")
    p.add_argument("--out", default="docs/results/delta_compression.json")
    args = p.parse_args()

    start, load = time.time(), os.getloadavg()
    finetunes = {mode: ensure_finetune(args.model, mode, args.minutes, args.max_steps)
                 for mode in ("full", "lora", "lora1bit")}
    base = load_model(args.model)
    train_set, held_out = task_examples()
    examples = encoded(held_out if args.split == "heldout" else train_set[:len(held_out)], base.tokenizer,
                       base.config.vocab_size)

    def score(text: str | None) -> dict:
        loaded = dataclasses.replace(base, model=copy.deepcopy(base.model))
        if text:
            apply_compression(loaded, [TechniqueSpec.parse(t) for t in text.split("+")])
        stored, uncompressed = delta_bytes(loaded.model)
        row = {"spec": text or "base", "loss": heldout_loss(loaded.model, examples), "delta_bytes": stored,
               "delta_reference_bytes": uncompressed}
        print(f"{row['spec']:24s} held-out loss {row['loss']:.4f}  delta {stored} of {uncompressed} bytes", flush=True)
        return row

    rows = {"base": score(None)}
    for text in dict.fromkeys([reference(s) for s in args.specs] + args.specs):
        rows[text] = score(text)
    for text in args.specs:
        row, tuned = rows[text], rows[reference(text)]
        row["gain_kept"] = (rows["base"]["loss"] - row["loss"]) / (rows["base"]["loss"] - tuned["loss"])
        row["bytes_ratio"] = row["delta_bytes"] / row["delta_reference_bytes"]
        row["meets_bar"] = row["gain_kept"] >= BAR_GAIN and row["bytes_ratio"] <= BAR_BYTES
        print(f"{text:24s} keeps {row['gain_kept']:.1%} of the gain at {row['bytes_ratio']:.2%} of the delta's "
              f"bytes ({'meets' if row['meets_bar'] else 'misses'} the bar)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"command": "python scripts/delta_compression.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                            vars(args).items() if k != "specs")
              + " --specs " + " ".join(args.specs),
              "model": args.model, "dtype": str(base.dtype), "commit": commit, "loadavg": load,
              "seconds": round(time.time() - start), "split": args.split, "examples": len(examples),
              "finetunes": finetunes,
              "bar": {"gain_kept": BAR_GAIN, "bytes_ratio": BAR_BYTES}, "rows": list(rows.values())}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
