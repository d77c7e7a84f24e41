"""`workbench finetune`: the short fine-tune whose delta `--compress finetune|dare|compeft|adapter1bit` apply.

The parser is torch-free (the CLI builds it before torch loads); the work is in training/finetune.py.
"""

from __future__ import annotations

import argparse
import json

from workbench.spec import DEFAULT_MODEL


def add_finetune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune the model briefly (full layers or LoRA) for the delta transforms",
                       description="Fine-tunes the model on a task built from Python's standard library (a "
                       "function's signature -> the first line of its docstring; every fourth module held out) "
                       "and caches the delta next to the model. `--compress finetune` applies it as is; `dare`, "
                       "`compeft` and `adapter1bit` apply it compressed.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="auto")
    p.add_argument("--mode", choices=("full", "lora", "lora1bit"), default="full",
                   help="full: the layers' own weights (a dense delta); lora: LoRA adapters; lora1bit: LoRA trained "
                   "through its 1-bit form, for adapter1bit (default full)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (--mode lora or lora1bit; default 16)")
    p.add_argument("--layers", default="auto", help="decoder layers tuned, as the transforms' `layers` selector "
                   "(auto: the last 4 for full, all for the LoRA modes)")
    p.add_argument("--minutes", type=float, default=4.0, help="time budget of the training loop (default 4)")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4 full, 1e-3 lora)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report (held-out losses, loss curve) here")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from workbench.models import load_model
    from workbench.training.checkpoints import save_checkpoint
    from workbench.training.finetune import finetune, finetune_path, finetune_settings

    loaded = load_model(args.model, "float32", args.device)  # trained in float32; applied in any dtype
    settings = finetune_settings(args.mode, args.rank, args.layers, len(loaded.model.layers))
    payload = finetune(loaded.model, loaded.tokenizer, settings, minutes=args.minutes, max_steps=args.max_steps,
                       batch=args.batch, lr=args.lr, seed=args.seed)
    path = finetune_path(loaded.model, settings)
    save_checkpoint(path, payload)
    report = payload["report"]
    print(f"fine-tuned ({args.mode}, layers {settings['layers']}) for {report['steps']} steps in "
          f"{report['train_seconds'] / 60:.1f} min: held-out loss {report['base_loss']:.3f} -> "
          f"{report['tuned_loss']:.3f} ({report['heldout_examples']} examples)")
    tune = f"tune={args.mode}" + (f",tune_rank={args.rank}" if args.mode != "full" and args.rank != 16 else "") + (
        f",tune_layers={args.layers}" if args.layers != "auto" else "")
    print(f"saved {path}; apply it with --compress finetune:{tune} (or dare/compeft/adapter1bit with the same)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "settings": settings, **report}, f, indent=1)
    return 0
