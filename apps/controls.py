"""A configuration column's controls, generated from the registry, and the spec string they edit.

The spec box is the one truth: the generate button reads it. Controls are an editor for it: a user's
change to a control rewrites the spec box (`.input`, which programmatic updates do not fire), and any
change of the spec box (typed, a preset, a permalink, a replay) sets the controls and the preset menu, which
reads "(custom)" unless the box equals a preset (`.change`). A spec the controls cannot show (several
composed cache policies, say) stays in the box as typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from workbench import registry
from workbench.errors import WorkbenchError
from workbench.registry import Param
from workbench.spec import RunSpec, TechniqueSpec

from .about import spec_about
from .presets import CUSTOM, available_presets, preset_for

# Spec field, registry category, label, what "none" means (None: a technique must be chosen).
FIELDS = (("decode", "decoding", "decoding", None), ("accept", "acceptance", "acceptance rule", "(drafter's own)"),
          ("cache", "cache", "KV-cache policy", "(dense)"), ("compress", "compression", "weight transform", "(none)"))
SAMPLING = ("temperature", "top_k", "top_p", "seed")


def listed(category: str) -> list[registry.Technique]:
    """Techniques offered in the app: test-only ones (leading underscore) and the plain dense cache are not."""
    return [t for t in registry.techniques(category) if not t.name.startswith("_")
            and not (category == "cache" and t.name == "dense")]


def param_component(p: Param) -> gr.components.Component:
    info = p.help or None
    if p.type == "bool":
        return gr.Checkbox(value=bool(p.default), label=p.name, info=info)
    if p.choices:
        return gr.Dropdown(choices=list(p.choices), value=p.default, label=p.name, info=info)
    if p.type in ("int", "float"):
        return gr.Number(value=p.default, label=p.name, info=info, minimum=p.min, maximum=p.max,
                         precision=0 if p.type == "int" else None)
    return gr.Textbox(value="" if p.default is None else str(p.default), label=p.name, info=info)


@dataclass
class ColumnControls:
    index: int
    preset: gr.Dropdown
    spec: gr.Textbox
    choosers: dict[str, gr.Dropdown] = field(default_factory=dict)
    groups: dict[str, dict[str, gr.Group]] = field(default_factory=dict)
    params: dict[str, dict[str, list[tuple[Param, Any]]]] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    about: gr.Markdown | None = None  # each technique's summary and paper (about.spec_about)

    def editors(self) -> list[Any]:
        """Every control that edits the spec, in a fixed order (inputs of `to_spec`, outputs of `from_spec`)."""
        out: list[Any] = list(self.choosers.values())
        for techniques in self.params.values():
            for controls in techniques.values():
                out += [c for _, c in controls]
        return out + list(self.sampling.values())

    def group_list(self) -> list[gr.Group]:
        return [g for groups in self.groups.values() for g in groups.values()]

    def to_spec(self, *values: Any) -> str:
        """The spec string the controls describe (non-default values only)."""
        it = iter(values)
        chosen = {name: next(it) for name in self.choosers}
        spec = RunSpec()
        for name, _, _, none in FIELDS:
            params = {}
            for technique, controls in self.params[name].items():
                for p, _ in controls:
                    value = next(it)
                    if technique == chosen[name]:
                        try:
                            value = p.coerce(technique, value)
                        except WorkbenchError:
                            pass  # kept as typed: running the spec says what is wrong with it
                        if value != p.default:
                            params[p.name] = value
            picked = chosen[name]
            if picked in (None, none):
                continue
            technique = TechniqueSpec(picked, params)
            if name in ("cache", "compress"):
                setattr(spec, name, [technique])
            else:
                setattr(spec, name, technique)
        for name in SAMPLING:
            value = next(it)
            if value is not None:
                setattr(spec, name, int(value) if name in ("top_k", "seed") else float(value))
        return spec.to_string()

    def from_spec(self, text: str) -> list[Any]:
        """Updates for `editors()` then `group_list()` showing `text`; unchanged controls if it does not parse."""
        try:
            spec = RunSpec.parse(text or "")
        except WorkbenchError:
            return [gr.skip()] * (len(self.editors()) + len(self.group_list()))
        chosen: dict[str, TechniqueSpec | None] = {}
        for name, _, _, _ in FIELDS:
            value = getattr(spec, name)
            chosen[name] = (value[0] if value else None) if isinstance(value, list) else value
        updates: list[Any] = []
        for name, _, _, none in FIELDS:
            t = chosen[name]
            updates.append(t.name if t is not None and t.name in self.params[name] else (none or "plain"))
        for name, _, _, _ in FIELDS:
            t = chosen[name]
            for technique, controls in self.params[name].items():
                given = t.params if t is not None and t.name == technique else {}
                for p, _ in controls:
                    value = given.get(p.name, p.default)
                    try:
                        value = p.coerce(technique, value)
                    except WorkbenchError:
                        pass
                    updates.append(value)
        updates += [getattr(spec, name) for name in SAMPLING]
        for name, _, _, _ in FIELDS:
            t = chosen[name]
            for technique in self.groups[name]:
                updates.append(gr.update(visible=t is not None and t.name == technique))
        return updates


def build_column_controls(index: int, spec_text: str) -> ColumnControls:
    """The controls of one column, laid out in the current Blocks context."""
    presets = available_presets()
    preset = gr.Dropdown(choices=[CUSTOM, *presets], value=preset_for(spec_text), label="preset", interactive=True,
                         elem_classes=["wb-preset"])
    spec = gr.Textbox(value=spec_text, label="spec (short string; the controls below edit it)", max_lines=2,
                      elem_classes=["wb-spec"])
    cc = ColumnControls(index, preset, spec, about=gr.Markdown(spec_about(spec_text), elem_classes=["wb-about"]))
    with gr.Accordion("techniques and sampling", open=False):
        for name, category, label, none in FIELDS:
            techniques = listed(category)
            choices = ([none] if none else []) + [t.name for t in techniques]
            cc.choosers[name] = gr.Dropdown(choices=choices, value=choices[0] if none else "plain", label=label,
                                            interactive=True)
            cc.groups[name], cc.params[name] = {}, {}
            for t in techniques:
                with gr.Group(visible=False) as group:
                    cc.params[name][t.name] = [(p, param_component(p)) for p in t.params]
                cc.groups[name][t.name] = group
        with gr.Row():
            cc.sampling["temperature"] = gr.Number(value=0.0, minimum=0, label="temperature", info="0 is greedy")
            cc.sampling["top_k"] = gr.Number(value=0, minimum=0, precision=0, label="top_k")
            cc.sampling["top_p"] = gr.Number(value=1.0, minimum=0, maximum=1, label="top_p")
            cc.sampling["seed"] = gr.Number(value=0, precision=0, label="seed")
    return cc


def wire_column_controls(cc: ColumnControls) -> None:
    editors = cc.editors()
    gr.on([c.input for c in editors], cc.to_spec, inputs=editors, outputs=cc.spec, show_progress="hidden",
          api_visibility="private")
    cc.spec.change(cc.from_spec, inputs=cc.spec, outputs=editors + cc.group_list(), show_progress="hidden",
                   api_visibility="private")
    # The menu follows the box, however it changed (typed, a control, a preset, a link, a replay).
    cc.spec.change(preset_for, inputs=cc.spec, outputs=cc.preset, show_progress="hidden", api_visibility="private")
    cc.spec.change(spec_about, inputs=cc.spec, outputs=cc.about, show_progress="hidden", api_visibility="private")
    presets = available_presets()
    cc.preset.input(lambda name: presets.get(name, gr.skip()), inputs=cc.preset, outputs=cc.spec,
                    show_progress="hidden", api_visibility="private")
