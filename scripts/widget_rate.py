"""How fast the notebook widgets show a race: tokens displayed per second and screen updates per second.

A Jupyter kernel (started by nbclient, which plays the notebook front end and receives every widget message)
runs the same configurations twice on the same model, each time in a background thread: first through the
race's own mechanism with nothing shown (`workbench.views.live.race`, the baseline), then as a
`workbench.widgets.Race` shown in the notebook. Tokens
displayed per second are the tokens appended to the race's token streams over the race's wall time; the
ratio to the baseline's tokens per second is what showing the race costs. Also reported: the characters
the token streams sent, against what an HTML widget resending its whole text at every update would send.

    .venv/bin/python scripts/widget_rate.py                       # embedded model, docs/results/widget_rate.json
    .venv/bin/python scripts/widget_rate.py --model random:llama --max-new-tokens 8 --out ''
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from workbench.spec import DEFAULT_MODEL

PROMPT = ("Repeat this list exactly, twice: apples, pears, plums, cherries, grapes, lemons, limes, figs, dates, "
          "apricots, peaches, melons.")
ID_PROMPT = "5 6 7 8 9 10 5 6 7 8 9 10 5 6"  # a random model has no tokenizer: token ids
CELL = """
import json, os, statistics, threading, time
from workbench.api import Workbench
from workbench.provenance import provenance
from workbench.views.live import race as plain_race
from workbench.widgets import Race

args = json.loads({args!r})
wb = Workbench(args["model"], freeze_gc=True)
settings = dict(max_new_tokens=args["max_new_tokens"], ignore_eos=True)
rows = []

def baseline():  # the race's own mechanism with nothing shown, in a thread as the widget runs it
    t0 = time.perf_counter()
    for lanes in plain_race(wb, args["prompt"], args["specs"], lambda i: False, **settings):
        pass
    rows[-1].update(baseline_tokens=sum(len(lane.trace.token_ids) for lane in lanes),
                    baseline_wall_s=time.perf_counter() - t0)

def shown():
    race = Race(args["prompt"], args["specs"], wb=wb, every_s=args["every_s"],
                figure_every_s=args["figure_every_s"], **settings)
    display(race)
    race.wait()
    return race

def plain():
    thread = threading.Thread(target=baseline)
    thread.start()
    thread.join()

# The first pair is a warm-up (first-call costs are in neither figure); the order alternates, so a machine
# that slows down or speeds up during the run favours neither.
for repeat in range(args["repeats"] + 1):
    rows.append({{}})
    if repeat % 2:
        race = shown()
        plain()
    else:
        plain()
        race = shown()
    assert race.error is None and all(t.status == "done" for t in race.traces), race.error
    row = rows[-1]
    row.update(tokens_shown=race.tokens_shown, updates=race.updates, race_wall_s=race.elapsed_s,
               stream_chars_sent=sum(s.sent_chars for s in race.streams),
               whole_text_resend_chars=sum(s.resend_chars for s in race.streams))
    row.update(tokens_displayed_per_s=row["tokens_shown"] / row["race_wall_s"],
               updates_per_s=row["updates"] / row["race_wall_s"],
               baseline_tok_per_s=row["baseline_tokens"] / row["baseline_wall_s"])
    row["displayed_vs_baseline"] = row["tokens_displayed_per_s"] / row["baseline_tok_per_s"]
measured = rows[1:]
median = {{key: statistics.median(r[key] for r in measured) for key in measured[0]}}
loaded = wb.model(wb.default)
print("RESULT " + json.dumps({{
    "model": args["model"], "specs": args["specs"], "max_new_tokens": args["max_new_tokens"],
    "every_s": args["every_s"], "figure_every_s": args["figure_every_s"], "repeats": args["repeats"],
    "median": median, "runs": measured, "load_average_1min": os.getloadavg()[0],
    "provenance": {{k: v for k, v in provenance(loaded.model, loaded.device, loaded.dtype).items()
                   if k in ("commit", "dirty", "cpu", "threads", "dtype")}},
}}, default=str))
"""

def measure(model: str, specs: list[str], max_new_tokens: int, every_s: float, figure_every_s: float,
            repeats: int, timeout_s: int = 900) -> dict:
    args = json.dumps({"model": model, "specs": specs, "max_new_tokens": max_new_tokens, "every_s": every_s,
                       "figure_every_s": figure_every_s, "repeats": repeats,
                       "prompt": ID_PROMPT if model.startswith("random:") else PROMPT})
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL.format(args=args))])
    NotebookClient(notebook, timeout=timeout_s, kernel_name="python3").execute()
    outputs = notebook.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    if "RESULT " not in text:
        raise RuntimeError(f"the notebook printed no result:\n{text[-2000:]}")
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    result["widget_views_displayed"] = len(widgets)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--specs", default="decode=plain,decode=prompt_lookup", help="comma-separated spec strings")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--every", type=float, default=0.25, help="seconds between screen updates (Race's every_s)")
    parser.add_argument("--figure-every", type=float, default=1.0,
                        help="seconds between redraws of the speed-and-memory figure (Race's figure_every_s)")
    parser.add_argument("--repeats", type=int, default=3, help="baseline and race pairs measured (medians reported)")
    parser.add_argument("--out", default="docs/results/widget_rate.json", help="JSON file ('' to only print)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = measure(args.model, args.specs.split(","), args.max_new_tokens, args.every, args.figure_every,
                     args.repeats)
    result["command"] = ("python scripts/widget_rate.py" + (f" --model {args.model}" if args.model != DEFAULT_MODEL
                                                           else ""))
    m = result["median"]
    print(f"median of {args.repeats}: {m['tokens_shown']:.0f} tokens shown in {m['race_wall_s']:.2f} s: "
          f"{m['tokens_displayed_per_s']:.1f} tokens displayed/s, {m['updates_per_s']:.2f} updates/s; without widgets "
          f"{m['baseline_tok_per_s']:.1f} tok/s (ratio {m['displayed_vs_baseline']:.3f}); token streams sent "
          f"{m['stream_chars_sent']:.0f} characters, whole-text updates would send {m['whole_text_resend_chars']:.0f} "
          f"({time.perf_counter() - t0:.0f} s in all)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
