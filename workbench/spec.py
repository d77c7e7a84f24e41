"""RunSpec: the one description of a run, to and from JSON and a short string.

The short string is what the CLI, permalinks and the store use:

    decode=prompt_lookup:k=8;cache=kivi:bits=2;temperature=0.7

Fields are `key=value` separated by `;`. A technique is `name:param=value,param=value`; techniques that
compose (cache policies, weight transforms) are joined with `+` and apply in that order. Characters that
would break this (`;,:=+|%` and whitespace) are percent-encoded inside values. Only fields that differ
from their defaults are written, so the string of a default run is empty.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from workbench import registry
from workbench.errors import SpecError

DEFAULT_MODEL = "smollm2-135m"
# Kept readable; everything else outside [A-Za-z0-9] is percent-encoded. Technique parameter values
# also encode `:`, `,`, `=` and `+`, which separate the parts of a technique.
_SAFE_FIELD = "/.-_~@()[]<>!*':,=+"
_SAFE_PARAM = "/.-_~@()[]<>!*'"
# auto: CUDA graphs of the decoding step on a CUDA device, off elsewhere; on: the static step everywhere
# (captured on CUDA, eager elsewhere); off: the eager forward; compile: torch.compile(mode="reduce-overhead")
GRAPH_MODES = ("auto", "on", "off", "compile")


def _enc(value: Any, safe: str = _SAFE_PARAM) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    return quote(str(value), safe=safe)


@dataclass
class TechniqueSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_string(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_enc(v)}" for k, v in self.params.items())

    @classmethod
    def parse(cls, text: str) -> TechniqueSpec:
        name, _, rest = text.strip().partition(":")
        if not name:
            raise SpecError(f"empty technique name in {text!r}; expected name or name:param=value,...")
        params = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise SpecError(f"parameter {item!r} of {name!r} has no value; expected param=value")
            params[key.strip()] = unquote(value)
        return cls(unquote(name), params)

    def validated(self, category: str) -> TechniqueSpec:
        technique = registry.get(category, self.name)
        return TechniqueSpec(self.name, technique.validate(self.params))

    def build(self, category: str) -> Any:
        return registry.get(category, self.name).build(self.params)


@dataclass
class RunSpec:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    decode: TechniqueSpec = field(default_factory=lambda: TechniqueSpec("plain"))
    accept: TechniqueSpec | None = None  # None: the drafter's own choice
    cache: list[TechniqueSpec] = field(default_factory=list)  # empty: the dense cache
    compress: list[TechniqueSpec] = field(default_factory=list)  # applied in order
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    chat: bool | None = None  # None: use the chat template when the model has one
    graphs: str = "auto"  # the static decoding step (workbench/models/static_step.py): one of GRAPH_MODES

    # ---- validation -------------------------------------------------------------------------------
    def validated(self) -> RunSpec:
        """A copy with every technique and parameter checked and coerced; raises SpecError."""
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SpecError(f"unknown dtype {self.dtype!r}; valid: auto, float32, bfloat16, float16")
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 keeps every token), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.graphs in GRAPH_MODES, f"unknown graphs mode {self.graphs!r}; valid: auto (CUDA graphs on a CUDA "
             "device, off elsewhere), on (the static step everywhere), off, compile (torch.compile, CUDA only)"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpecError(message)
        decode = self.decode.validated("decoding")
        accept = self.accept.validated("acceptance") if self.accept else None
        if accept is not None:  # a pairing that cannot work is refused here, not during the run
            accept.build("acceptance").check_drafter(decode.build("decoding"))
        return dataclasses.replace(
            self,
            decode=decode,
            accept=accept,
            cache=[t.validated("cache") for t in self.cache],
            compress=[t.validated("compression") for t in self.compress],
        )

    @property
    def lossless(self) -> bool:
        """Whether the run keeps the target's output: its drafter, its acceptor (the drafter's default when none
        is named), every cache policy and every weight transform are all lossless in this run (each one's
        declaration, or its own judgement of the run: `Technique.lossless_in`). Lossy runs are labelled so
        everywhere (JSON, store, app)."""
        accept = self.accept or TechniqueSpec(registry.get("decoding", self.decode.name).cls.default_acceptor)
        parts = [("decoding", self.decode), ("acceptance", accept)]
        parts += [("cache", t) for t in self.cache] + [("compression", t) for t in self.compress]
        return all(registry.get(category, t.name).lossless_in(t.params, self) for category, t in parts)

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown spec fields {sorted(unknown)}; valid: {', '.join(sorted(known))}")
        data = dict(data)
        tech = lambda d: TechniqueSpec(d["name"], dict(d.get("params") or {}))  # noqa: E731
        if "decode" in data:
            data["decode"] = tech(data["decode"])
        if data.get("accept"):
            data["accept"] = tech(data["accept"])
        for key in ("cache", "compress"):
            if key in data:
                data[key] = [tech(d) for d in data[key]]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise SpecError(f"not a valid RunSpec JSON: {err}") from None

    # ---- short string -----------------------------------------------------------------------------
    def to_string(self) -> str:
        default = RunSpec()
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            if isinstance(value, TechniqueSpec):
                text = value.to_string()
            elif f.name in ("cache", "compress"):
                text = "+".join(t.to_string() for t in value)
            elif f.name == "stop":
                text = "|".join(_enc(s) for s in value)
            else:
                text = _enc(value, _SAFE_FIELD)
            parts.append(f"{f.name}={text}")
        return ";".join(parts)

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        spec = cls()
        for item in filter(None, (s.strip() for s in text.split(";"))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in fields:
                raise SpecError(f"bad spec field {item!r}; expected key=value with key one of: "
                                f"{', '.join(fields)}")
            setattr(spec, key, _parse_field(key, value, fields[key].type))
        return spec


def _parse_field(key: str, value: str, type_name: Any) -> Any:
    if key in ("decode", "accept"):
        return TechniqueSpec.parse(value)
    if key in ("cache", "compress"):
        return [TechniqueSpec.parse(t) for t in value.split("+") if t.strip()]
    if key == "stop":
        return [unquote(s) for s in value.split("|") if s]
    value = unquote(value)
    try:
        if key == "chat":
            return {"true": True, "false": False, "auto": None}[value.lower()]
        if key == "ignore_eos":
            return {"true": True, "false": False}[value.lower()]
        if key in ("top_k", "seed", "max_new_tokens"):
            return int(value)
        if key in ("temperature", "top_p", "min_p"):
            return float(value)
    except (ValueError, KeyError):
        raise SpecError(f"bad value for {key}: {value!r}") from None
    return value
