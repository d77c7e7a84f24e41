"""A sweep's grid: base specs times axes over spec fields and technique parameters, times prompts, seeds
and repeats, expanded into cells. Each cell has a key (a hash of its canonical spec string, prompt, seed,
max_new_tokens, model and repeat), so a re-run sweep skips the cells already stored.

A grid file is TOML (or YAML with the same keys):

    name = "cache policies"
    specs = ["decode=plain", "decode=prompt_lookup:k=8"]    # base specs (default: one plain spec)
    max_new_tokens = 32
    seeds = [0, 1]
    repeats = 1
    [axes]                                                   # each axis multiplies the cells
    cache = ["", "h2o:budget=64", "kivi:bits=2"]             # a spec field, in the short string's form
    "decode.k" = [4, 8]                                      # a parameter of the spec's decode technique
    [prompts]
    file = "prompts.txt"                                     # one prompt per line (relative to the grid file)
    # or: suite = ["qa", "math"], per_category = 2            (the prompt suite, workbench/eval/suite.py)
    # or: text = ["first prompt", "second prompt"]
    # or: long_context = [2048, 4096]            (the long-context suite at these lengths, all tasks; or a
    #     table: long_context = { lengths = [2048], tasks = ["passkey", "kv"], per_cell = 1, seed = 0 })
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import SpecError, WorkbenchError
from workbench.spec import DEFAULT_MODEL, RunSpec

GRID_KEYS = {"name", "specs", "axes", "prompts", "max_new_tokens", "seeds", "repeats", "model", "dtype", "device"}
PROMPT_KEYS = {"file", "suite", "per_category", "text", "long_context"}
LONG_CONTEXT_KEYS = {"lengths", "tasks", "per_cell", "seed"}
TECHNIQUE_FIELDS = ("decode", "accept", "cache", "compress")  # "field.param" axes set a technique's parameter


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a validated spec (seed and length set) on one prompt."""
    index: int
    spec: RunSpec
    prompt: str
    seed: int
    repeat: int
    key: str

    def to_dict(self) -> dict[str, Any]:  # what travels to a worker
        return {"index": self.index, "spec": self.spec.to_json(), "prompt": self.prompt, "seed": self.seed,
                "repeat": self.repeat, "key": self.key}


def cell_key(spec: RunSpec, prompt: str, seed: int, repeat: int = 0) -> str:
    """The cell's identity: canonical spec string, prompt text, seed, max_new_tokens, model id (and the repeat
    index when above 0), hashed."""
    parts = {"spec": spec.to_string(), "prompt": prompt, "seed": seed, "max_new_tokens": spec.max_new_tokens,
             "model": spec.model}
    if repeat:
        parts["repeat"] = repeat
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Grid:
    name: str = ""
    specs: list[str] = field(default_factory=lambda: [""])
    axes: dict[str, list[Any]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    seeds: list[int] = field(default_factory=lambda: [0])
    repeats: int = 1
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"

    def sweep_id(self) -> str:
        """The same grid (whatever its name) gives the same id, so a re-run's cells land in the same sweep."""
        grid = {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}
        canonical = json.dumps(grid, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def cells(self) -> list[Cell]:
        """Every (spec, prompt, seed, repeat), specs in grid order, then prompts, seeds and repeats."""
        if not self.prompts:
            raise WorkbenchError("the sweep has no prompts; give --prompts FILE, --suite CATEGORIES or a grid's "
                                 "[prompts] table")
        if self.repeats < 1 or self.max_new_tokens < 1:
            raise WorkbenchError("repeats and max_new_tokens must be at least 1")
        specs = self.specs_expanded()
        out = []
        for spec, prompt, seed, repeat in itertools.product(specs, self.prompts, self.seeds, range(self.repeats)):
            seeded = dataclasses.replace(spec, seed=seed)
            out.append(Cell(len(out), seeded, prompt, seed, repeat, cell_key(seeded, prompt, seed, repeat)))
        return out

    def specs_expanded(self) -> list[RunSpec]:
        """The base specs times every axis, validated; duplicates (an axis value equal to a base) kept once."""
        names = list(self.axes)
        out: dict[str, RunSpec] = {}
        for base in self.specs:
            for values in itertools.product(*(self.axes[n] for n in names)):
                spec = RunSpec.parse(base)
                for name, value in zip(names, values):
                    _set_axis(spec, name, value)
                spec.model, spec.dtype, spec.device = _fill(spec, self)
                spec.max_new_tokens = self.max_new_tokens
                spec = spec.validated()
                out.setdefault(spec.to_string(), spec)
        return list(out.values())


def _fill(spec: RunSpec, grid: Grid) -> tuple[str, str, str]:
    """The grid's model, dtype and device where the spec leaves them at their defaults."""
    default = RunSpec()
    return tuple(getattr(grid, k) if getattr(spec, k) == getattr(default, k) else getattr(spec, k)
                 for k in ("model", "dtype", "device"))  # type: ignore[return-value]


def _set_axis(spec: RunSpec, name: str, value: Any) -> None:
    """`field` takes a value in the short string's form; `technique.param` sets one technique parameter."""
    field_name, dot, param = name.partition(".")
    if not dot:
        parsed = RunSpec.parse(f"{name}={_text(value)}")
        setattr(spec, name, getattr(parsed, name))
        return
    if field_name not in TECHNIQUE_FIELDS:
        raise SpecError(f"bad axis {name!r}: a parameter axis is technique.param with technique one of "
                        f"{', '.join(TECHNIQUE_FIELDS)}")
    target = getattr(spec, field_name)
    if isinstance(target, list):
        if len(target) != 1:
            raise SpecError(f"axis {name!r} needs exactly one {field_name} technique in the spec, it has "
                            f"{len(target)}; set the {field_name} field instead")
        target = target[0]
    if target is None:
        raise SpecError(f"axis {name!r}: the spec names no {field_name} technique")
    target.params[param] = _text(value)


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise WorkbenchError(f"cannot read the prompts file {path}: {err.strerror or err}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise WorkbenchError(f"the prompts file {path} has no prompts; write one prompt per line")
    return prompts


def suite_prompts(categories: list[str] | str | None, per_category: int | None) -> list[str]:
    from workbench.eval.suite import suite

    try:
        return [p.prompt for p in suite(categories, per_category)]
    except ValueError as err:
        raise WorkbenchError(str(err)) from None


def long_context_prompts(model: str, lengths: list[int], tasks: list[str] | None = None, per_cell: int = 1,
                         seed: int = 0) -> list[str]:
    """The long-context suite's prompts (workbench/eval/long_context.py) at `lengths` tokens of `model`'s
    tokenizer (UTF-8 bytes for a model without one), read without loading the weights."""
    from workbench.eval.long_context import TASKS, long_context_suite
    from workbench.models import load_model_tokenizer

    try:
        lengths = [int(n) for n in lengths]
    except (TypeError, ValueError):
        raise WorkbenchError(f"bad long-context lengths {lengths!r}; expected token counts such as 2048") from None
    if not lengths or min(lengths) < 64:
        raise WorkbenchError(f"bad long-context lengths {lengths!r}; give at least one length of 64 tokens or more")
    unknown = set(tasks or ()) - set(TASKS)
    if unknown:
        raise WorkbenchError(f"unknown long-context tasks {sorted(unknown)}; valid: {', '.join(TASKS)}")
    tokenizer = load_model_tokenizer(model)
    count = (lambda text: len(tokenizer.encode(text))) if tokenizer is not None else (lambda text: len(text.encode()))
    items = long_context_suite(count, lengths, tasks or TASKS, per_cell, seed)
    return [item.prompt for item in items]


def _long_context_from(value: Any, model: str) -> list[str]:
    if isinstance(value, dict):
        unknown = set(value) - LONG_CONTEXT_KEYS
        if unknown:
            raise WorkbenchError(f"unknown keys in long_context: {sorted(unknown)}; valid: "
                                 f"{', '.join(sorted(LONG_CONTEXT_KEYS))}")
        return long_context_prompts(model, list(value.get("lengths") or []), value.get("tasks"),
                                    int(value.get("per_cell", 1)), int(value.get("seed", 0)))
    return long_context_prompts(model, value if isinstance(value, list) else [value])


def prompts_from(table: dict[str, Any], folder: Path, model: str = DEFAULT_MODEL) -> list[str]:
    unknown = set(table) - PROMPT_KEYS
    if unknown:
        raise WorkbenchError(f"unknown keys in [prompts]: {sorted(unknown)}; valid: {', '.join(sorted(PROMPT_KEYS))}")
    out: list[str] = []
    if "file" in table:
        out += read_prompts(folder / table["file"])
    if "suite" in table:
        out += suite_prompts(table["suite"], table.get("per_category"))
    if "long_context" in table:
        out += _long_context_from(table["long_context"], model)
    out += [str(t) for t in table.get("text", [])]
    return out


def load_grid(path: str | Path, model: str | None = None) -> Grid:
    """A Grid from a TOML (.toml) or YAML (.yaml, .yml) file; `model` overrides the file's (its tokenizer
    measures long-context prompts)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise WorkbenchError(f"cannot read the grid file {path}: {err.strerror or err}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as err:
                raise ValueError(str(err)) from None
        else:
            raise WorkbenchError(f"grid file {path}: expected a .toml, .yaml or .yml file")
    except ValueError as err:  # tomllib.TOMLDecodeError is one
        raise WorkbenchError(f"grid file {path} is not valid {path.suffix[1:].upper()}: {err}") from None
    unknown = set(data) - GRID_KEYS
    if unknown:
        raise WorkbenchError(f"unknown keys in {path}: {sorted(unknown)}; valid: {', '.join(sorted(GRID_KEYS))}")
    grid = Grid(**{k: v for k, v in data.items() if k != "prompts"})
    grid.model = model or grid.model
    grid.prompts = prompts_from(data.get("prompts") or {}, path.parent, grid.model)
    grid.axes = {k: list(v) if isinstance(v, list) else [v] for k, v in grid.axes.items()}
    grid.name = grid.name or path.stem
    return grid
