"""Technique registry: name -> class, and each technique's parameter schema.

A technique is a dataclass registered under a category. Its init fields are its parameters: type and
default come from the field, help and range from `param(...)` metadata. That one schema drives the CLI
help, the app's forms, validation of specs and the catalogue in docs/.
Fields declared with `init=False` are per-run state, not parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import typing
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import SpecError

CATEGORIES = ("decoding", "acceptance", "cache", "compression")
# Packages whose modules register techniques on import.
_TECHNIQUE_PACKAGES = ("workbench.decoding", "workbench.cache", "workbench.compression")


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          choices: typing.Sequence[Any] | None = None) -> Any:
    """A technique parameter: a dataclass field carrying help text and an allowed range."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices})


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "int", "float", "bool", "str"
    default: Any
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None

    def describe(self) -> str:
        allowed = ""
        if self.choices:
            allowed = " one of " + "/".join(map(str, self.choices))
        elif self.min is not None or self.max is not None:
            allowed = f" in [{'' if self.min is None else self.min}, {'' if self.max is None else self.max}]"
        return f"{self.name} ({self.type}, default {self.default!r}{allowed})"

    def coerce(self, technique: str, value: Any) -> Any:
        """Convert a value (possibly a string from the CLI or a link) and check its range."""
        try:
            if self.type == "bool":
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes")
                value = bool(value)
            elif self.type == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif self.type == "float":
                value = float(value)
            else:
                value = str(value)
        except ValueError:
            raise SpecError(f"{technique}: {self.name}={value!r} is not a valid {self.type}; "
                            f"expected {self.describe()}") from None
        if self.choices and value not in self.choices:
            raise SpecError(f"{technique}: {self.name}={value!r} is not allowed; expected {self.describe()}")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise SpecError(f"{technique}: {self.name}={value!r} is out of range; expected {self.describe()}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def _params_of(cls: type) -> tuple[Param, ...]:
    """A technique class's parameters, worked out once (type hints are slow to resolve, and every run builds
    its techniques from specs)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        type_name = {int: "int", float: "float", bool: "bool"}.get(kind, "str")
        default = f.default if f.default is not dataclasses.MISSING else None
        meta = f.metadata
        out.append(Param(f.name, type_name, default, meta.get("help", ""), meta.get("min"), meta.get("max"),
                         tuple(meta["choices"]) if meta.get("choices") else None))
    return tuple(out)


@dataclass(frozen=True)
class Technique:
    category: str
    name: str
    cls: type
    lossless: bool  # does it keep the target's output distribution (and greedy output) unchanged?

    @property
    def summary(self) -> str:
        """The docstring's first paragraph on one line (wrapped source lines and their indents collapse)."""
        return " ".join((self.cls.__doc__ or "").strip().split("\n\n")[0].split())

    @property
    def params(self) -> list[Param]:
        return list(_params_of(self.cls))

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Return params coerced to their types; unknown names and bad values raise SpecError."""
        schema = {p.name: p for p in self.params}
        out = {}
        for key, value in params.items():
            if key not in schema:
                valid = ", ".join(p.describe() for p in schema.values()) or "none"
                raise SpecError(f"{self.category} technique {self.name!r} has no parameter {key!r}; "
                                f"valid parameters: {valid}")
            out[key] = schema[key].coerce(self.name, value)
        # a preset (class attribute `presets`: name -> the parameters it sets) may not be contradicted
        preset = getattr(self.cls, "presets", {}).get(out.get("preset"), {})
        clash = [k for k, v in preset.items() if k in out and out[k] != v]
        if clash:
            sets = ", ".join(f"{k}={str(preset[k]).lower() if isinstance(preset[k], bool) else preset[k]}"
                             for k in clash)
            raise SpecError(f"{self.name}: preset={out['preset']} sets {sets}; drop {', '.join(clash)} or the preset")
        check = getattr(self.cls(**out), "check", None)  # rules across parameters, e.g. min < max
        if check is not None:
            try:
                check()
            except ValueError as err:
                raise SpecError(f"{self.name}: {err}") from None
        return out

    def build(self, params: dict[str, Any]) -> Any:
        return self.cls(**self.validate(params))

    def lossless_in(self, params: dict[str, Any], spec: Any) -> bool:
        """Whether this technique with `params` keeps the output of the run `spec` (a RunSpec): its declaration,
        unless its class judges each run itself with a method `lossless_for(spec)` (typical acceptance: exact
        at temperature 0, lossy when sampling)."""
        judge = getattr(self.cls, "lossless_for", None)
        return self.lossless if judge is None else bool(judge(self.build(params), spec))

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "name": self.name, "summary": self.summary,
                "lossless": self.lossless, "params": [p.to_dict() for p in self.params]}


_registry: dict[str, dict[str, Technique]] = {c: {} for c in CATEGORIES}


def register(category: str, name: str, *, lossless: bool):
    """Class decorator: `@register("decoding", "prompt_lookup", lossless=True)` above a dataclass.

    Every technique declares whether it changes the output: lossless drafters, acceptors that keep the
    target's distribution, the dense cache and exact encodings (dfloat11) do not; quantizing or evicting
    caches and lossy weight transforms do (pruning too, whatever its storage: it zeroes weights). A run is
    lossless only if all of its parts are (RunSpec.lossless); a technique whose losslessness depends on the run
    also defines `lossless_for(spec)` (see Technique.lossless_in), while its declaration says what holds in
    general (the catalogue shows it)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; categories: {', '.join(CATEGORIES)}")
    if not isinstance(lossless, bool):
        raise TypeError(f"{category} technique {name!r}: lossless must be True or False, got {lossless!r}")

    def wrap(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass to be registered")
        old = _registry[category].get(name)
        # A class defined again in a notebook or REPL (its cell run again) replaces the earlier definition.
        redefined = old is not None and old.cls.__module__ == cls.__module__ == "__main__" \
            and old.cls.__qualname__ == cls.__qualname__
        if old is not None and old.cls is not cls and not redefined:
            raise ValueError(f"{category} technique {name!r} is already registered")
        _registry[category][name] = Technique(category, name, cls, lossless)
        cls.technique_name = name
        return cls

    return wrap


def load_all() -> None:
    """Import every technique module so that all registrations have run."""
    for package in _TECHNIQUE_PACKAGES:
        importlib.import_module(package)


def techniques(category: str | None = None) -> list[Technique]:
    load_all()
    cats = CATEGORIES if category is None else (category,)
    return [t for c in cats for t in sorted(_registry[c].values(), key=lambda t: t.name)]


def get(category: str, name: str) -> Technique:
    load_all()
    if category not in _registry:
        raise SpecError(f"unknown category {category!r}; categories: {', '.join(CATEGORIES)}")
    if name not in _registry[category]:
        # names starting with "_" are stand-ins registered by tests, not offered to users
        valid = ", ".join(sorted(n for n in _registry[category] if not n.startswith("_"))) or "none yet"
        raise SpecError(f"unknown {category} technique {name!r}; valid: {valid}")
    return _registry[category][name]
