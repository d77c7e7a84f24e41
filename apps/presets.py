"""Named configurations offered in each column. A preset whose techniques are not registered (or whose
parameters do not validate) is hidden, so presets never break when a technique is renamed or absent."""

from __future__ import annotations

from workbench.errors import WorkbenchError
from workbench.spec import RunSpec

CUSTOM = "(custom)"  # the preset menu's entry for a spec that equals no preset
PRESETS: dict[str, str] = {
    "plain": "decode=plain",
    "prompt lookup": "decode=prompt_lookup",
    "token recycling": "decode=token_recycling",
    "token recycling + KIVI 2-bit": "decode=token_recycling;cache=kivi:bits=2",
    "self-speculative draft (first 4 layers)": "decode=draft_model:layers=4",
    "layer skip (SWIFT search)": "decode=layer_skip:granularity=sublayer,search=bayes",
    "prompt lookup + H2O": "decode=prompt_lookup;cache=h2o",
    "plain, int8 weights": "decode=plain;compress=int8",
}


def available_presets() -> dict[str, str]:
    """The presets whose spec validates against the registry as it is now."""
    out = {}
    for name, text in PRESETS.items():
        try:
            RunSpec.parse(text).validated()
        except WorkbenchError:
            continue
        out[name] = text
    return out


def _canonical(text: str) -> RunSpec:
    return RunSpec.parse(text or "").validated()


def preset_for(text: str) -> str:
    """The name of the offered preset whose spec equals `text` (parameters compared after validation, so
    `k=4` and `k=04` or an empty box and `decode=plain` are equal), else CUSTOM."""
    try:
        spec = _canonical(text)
    except WorkbenchError:
        return CUSTOM
    return next((name for name, preset in available_presets().items() if _canonical(preset) == spec), CUSTOM)
