"""`workbench train KIND`: train a drafter's heads on the target itself and save them next to the model."""

from __future__ import annotations

import argparse
import json

from workbench.spec import DEFAULT_MODEL

TRAINABLE = ("medusa", "hydra", "clover", "falcon", "fastdraft", "kangaroo", "ppd", "judge", "specdec")  # drafters,
# the judge acceptor's head and SpecDec++'s acceptance head, trained here


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a drafter (" + ", ".join(TRAINABLE) + ") on the model's own outputs",
                       description="Self-distillation: the model continues prompts built from Python's standard "
                       "library (never the benchmark suite's), then the drafter's heads learn to guess its next "
                       "tokens from its last-layer states. The checkpoint goes in the workbench cache next to the "
                       "model; `--decode KIND` then loads it.")
    p.add_argument("kind", choices=TRAINABLE)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--heads", type=int, default=4, help="number of draft heads (default 4)")
    p.add_argument("--layers", type=int, default=2, help="fastdraft: layers of the draft model; kangaroo: the "
                   "target's first layers it drafts with (default 2)")
    p.add_argument("--width", type=int, default=0, help="judge: hidden width of the judge head (default 0: linear)")
    p.add_argument("--tokens", type=int, default=3, help="ppd: prompt tokens appended to the input (default 3)")
    p.add_argument("--drafter", default="draft_model", help="specdec: the chain drafter whose drafts the acceptance "
                   "head judges, as in adaptive:drafter= (default draft_model)")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget of the training loop (default 8); "
                   "making the data takes a few minutes more the first time, then it is cached")
    p.add_argument("--prompts", type=int, default=160, help="training prompts (default 160)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens the model generates per prompt (default 128)")
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the training report (loss curve, held-out acceptance) here")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from workbench import registry
    from workbench.api import Workbench
    from workbench.errors import SpecError
    from workbench.training.checkpoints import trained_path
    from workbench.training.heads import train_heads, training_prompt_ids

    if not 1 <= args.heads <= 8:
        raise SpecError(f"--heads {args.heads} is out of range; expected 1 to 8")
    if args.minutes <= 0 or args.prompts < 2 or args.new_tokens < args.heads + 2:
        raise SpecError("--minutes must be positive, --prompts at least 2 and --new-tokens at least --heads + 2")
    if not 0 <= args.width <= 4096:
        raise SpecError(f"--width {args.width} is out of range; expected 0 (a linear head) to 4096")
    if args.kind == "specdec":  # a drafter adaptive can wrap, refused before the model loads
        from workbench.spec import TechniqueSpec

        TechniqueSpec("adaptive", {"drafter": args.drafter}).validated("decoding")
    wb = Workbench(args.model, args.dtype, args.device)
    loaded = wb.model(wb.default)
    if args.kind in ("ppd", "specdec"):  # prompt tokens (training/ppd.py), SpecDec++'s head (acceptance_head.py)
        from workbench.training import acceptance_head, ppd

        return _write_json(args, (ppd if args.kind == "ppd" else acceptance_head).train_command(loaded, args))
    if args.kind == "judge":  # the judge acceptor's head (decoding/judge.py, training/judge.py)
        from workbench.training.judge import train_command as train_judge_command

        return _write_json(args, train_judge_command(loaded, args))
    if args.kind == "fastdraft":  # a whole draft model, not heads: its own training (decoding/fastdraft.py)
        from workbench.decoding.fastdraft import train_command

        report = train_command(loaded, args)
        return _write_json(args, report)
    cls = registry.get("decoding", args.kind).cls
    settings = {"layers": args.layers} if args.kind == "kangaroo" else {"heads": args.heads}
    report = train_heads(cls, loaded.model, training_prompt_ids(loaded, args.prompts, args.seed), settings,
                         minutes=args.minutes, seed=args.seed, new_tokens=args.new_tokens,
                         eos_ids=loaded.eos_token_ids, max_steps=args.max_steps)
    path = trained_path(args.kind, loaded.model, settings)
    top1 = ", ".join(f"head {d + 1}: {row[0]:.2f}" for d, row in enumerate(report["acceptance"]))
    if args.kind == "kangaroo":  # one adapter, guessing the token after the target's own
        top1 = f"adapter: {report['acceptance'][0][0]:.2f}"
    shape = ", ".join(f"{k} {v}" for k, v in settings.items())
    print(f"trained {args.kind} ({shape}) in {report['train_seconds'] / 60:.1f} min "
          f"({report['steps']} steps, data {report['distill_seconds'] / 60:.1f} min, "
          f"{report['train_positions']} positions); final loss {report['curve'][-1][2]:.3f}")
    print(f"held-out top-1 acceptance: {top1}")
    if report.get("vocab_coverage"):
        print("held-out tokens inside the draft vocabulary: " + ", ".join(
            f"{size}: {share:.1%}" for size, share in report["vocab_coverage"].items()))
    defaults = {p.name: p.default for p in registry.get("decoding", args.kind).params}
    options = ",".join(f"{k}={v}" for k, v in settings.items() if v != defaults[k])
    print(f"saved {path}; run it with --decode {args.kind}" + (f":{options}" if options else ""))
    return _write_json(args, report)


def _write_json(args: argparse.Namespace, report: dict) -> int:
    if args.json:
        summary = {k: v for k, v in report.items() if k not in ("state_dict", "token_counts")}
        with open(args.json, "w") as f:
            json.dump({"kind": args.kind, "model": args.model, **summary}, f, indent=1)
    return 0
