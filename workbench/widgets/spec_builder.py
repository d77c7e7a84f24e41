"""SpecBuilder: a RunSpec from controls generated from the registry.

For each category (decoding, acceptance rule, KV-cache policy, weight compression) a dropdown of its
registered techniques, and under it one control per parameter of the chosen technique, built from the
parameter's schema (a dropdown for choices, a checkbox for a bool, a number or text box otherwise; the
tooltip gives its help, type, default and range). Values are checked by the registry, so a bad value is
refused with the same message the CLI gives. `builder.spec` is the RunSpec (it raises that message);
`Race(prompt, [builder, ...])` races it.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w

from workbench import registry
from workbench.errors import SpecError, WorkbenchError
from workbench.registry import Param
from workbench.spec import RunSpec, TechniqueSpec

NONE = {"acceptance": "(the drafter's own)", "cache": "dense (none)", "compression": "none"}
FIELD = {"decoding": "decode", "acceptance": "accept", "cache": "cache", "compression": "compress"}
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "seed", "max_new_tokens")


def param_control(p: Param) -> w.Widget:
    """One control for a technique parameter, from its schema."""
    tip = f"{p.help} ({p.describe()})".strip()
    common = {"description": p.name, "tooltip": tip,
              "style": {"description_width": "initial"}}
    if p.choices:
        return w.Dropdown(options=list(p.choices), value=p.default, **common)
    if p.type == "bool":
        return w.Checkbox(value=bool(p.default), indent=False, **common)
    if p.type == "int":
        return w.IntText(value=p.default if p.default is not None else 0, **common)
    if p.type == "float":
        return w.FloatText(value=p.default if p.default is not None else 0.0, **common)
    return w.Text(value="" if p.default is None else str(p.default), **common)


class CategoryControls(w.VBox):
    """A technique dropdown for one category and the chosen technique's parameter controls."""

    def __init__(self, category: str, on_change: Any):
        self.category = category
        names = [t.name for t in registry.techniques(category) if not t.name.startswith("_")]
        options = ([] if category == "decoding" else [NONE[category]]) + names
        self.choice = w.Dropdown(options=options, value="plain" if category == "decoding" else options[0],
                                 description=category, style={"description_width": "initial"})
        self.params: dict[str, tuple[Param, w.Widget]] = {}
        self.box = w.VBox(layout=w.Layout(margin="0 0 0 24px"))
        self._on_change = on_change
        self.choice.observe(lambda change: self._rebuild(), names="value")
        super().__init__([self.choice, self.box])
        self._rebuild()

    def _rebuild(self) -> None:
        self.params = {}
        if self.choice.value in NONE.values():
            self.box.children = ()
        else:
            technique = registry.get(self.category, self.choice.value)
            self.params = {p.name: (p, param_control(p)) for p in technique.params}
            summary = w.HTML(f"<small>{technique.summary}</small>")
            self.box.children = (summary, *(c for _, c in self.params.values()))
            for _, control in self.params.values():
                control.observe(lambda change: self._on_change(), names="value")
        self._on_change()

    def technique(self) -> TechniqueSpec | None:
        """The chosen technique with the parameters that differ from their defaults, checked by the registry."""
        if self.choice.value in NONE.values():
            return None
        params = {}
        for name, (p, control) in self.params.items():
            value = control.value
            if p.type == "str" and value == "" and p.default is None:
                continue
            if value != p.default:
                params[name] = value
        return TechniqueSpec(self.choice.value, params).validated(self.category)

    def load(self, technique: TechniqueSpec | None) -> None:
        self.choice.value = technique.name if technique is not None else NONE[self.category]
        for name, value in (technique.params if technique is not None else {}).items():
            self.params[name][1].value = value


class SpecBuilder(w.VBox):
    """`SpecBuilder(spec=None, model=None)`: controls for a RunSpec, starting from `spec` (a RunSpec or a spec
    string) if given; `.spec` is the RunSpec, `.error` what is wrong with the current values (or "")."""

    def __init__(self, spec: RunSpec | str | None = None, model: str | None = None):
        self._ready = False
        self.categories = {c: CategoryControls(c, self._refresh) for c in registry.CATEGORIES}
        defaults = RunSpec()
        self.sampling = {name: (w.FloatText if isinstance(getattr(defaults, name), float) else w.IntText)(
            value=getattr(defaults, name), description=name, style={"description_width": "initial"})
            for name in SAMPLING}
        for control in self.sampling.values():
            control.observe(lambda change: self._refresh(), names="value")
        self.model = model or defaults.model
        self.output = w.HTML()
        self._ready = True
        if spec is not None:
            self.load(spec)
        self._refresh()
        super().__init__([*self.categories.values(), w.HBox(list(self.sampling.values())[:3]),
                          w.HBox(list(self.sampling.values())[3:]), self.output])

    @property
    def spec(self) -> RunSpec:
        """The RunSpec the controls describe; a bad value raises SpecError with the registry's message."""
        cats = {c: controls.technique() for c, controls in self.categories.items()}
        spec = RunSpec(model=self.model, decode=cats["decoding"], accept=cats["acceptance"],
                       cache=[cats["cache"]] if cats["cache"] else [],
                       compress=[cats["compression"]] if cats["compression"] else [],
                       **{name: control.value for name, control in self.sampling.items()})
        return spec.validated()

    @property
    def error(self) -> str:
        try:
            _ = self.spec
        except WorkbenchError as err:
            return str(err)
        return ""

    def load(self, spec: RunSpec | str) -> None:
        """Set the controls to `spec`; a spec with two cache policies or transforms is refused (one a category
        here)."""
        spec = (RunSpec.parse(spec) if isinstance(spec, str) else spec).validated()
        if len(spec.cache) > 1 or len(spec.compress) > 1:
            raise SpecError("SpecBuilder holds one technique per category; this spec chains "
                            f"{len(spec.cache)} cache policies and {len(spec.compress)} transforms")
        self._ready = False
        try:
            if spec.model != RunSpec.model:  # a string that names no model keeps the builder's
                self.model = spec.model
            for category, value in (("decoding", spec.decode), ("acceptance", spec.accept),
                                    ("cache", spec.cache[0] if spec.cache else None),
                                    ("compression", spec.compress[0] if spec.compress else None)):
                self.categories[category].load(value)
            for name, control in self.sampling.items():
                control.value = getattr(spec, name)
        finally:
            self._ready = True
        self._refresh()

    def _refresh(self) -> None:
        """Show the spec string, or in red what is wrong and what is valid."""
        if not getattr(self, "_ready", False):
            return
        error = self.error
        self.output.value = (f'<span style="color: #b91c1c">{html.escape(error)}</span>' if error else
                             f"<code>{html.escape(self.spec.to_string() or 'decode=plain')}</code>")
