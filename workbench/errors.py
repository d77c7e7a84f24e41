"""Errors a user can cause and fix. Each message says what was wrong and what is valid.

Surfaces (CLI, app, widgets) catch `WorkbenchError` and show its message as one line, never a traceback.
"""


class WorkbenchError(Exception):
    """Base class for mistakes in what the user asked for (bad spec, prompt, model, dtype...)."""


class SpecError(WorkbenchError):
    """An unknown technique or parameter, or a value out of range."""


class ModelError(WorkbenchError):
    """A model that cannot be found or loaded, or an unsupported architecture."""


class PromptError(WorkbenchError):
    """An empty prompt, or one longer than the model's context window."""


class DeviceError(WorkbenchError):
    """A device or dtype the machine cannot run."""


class StoreError(WorkbenchError):
    """A store file that cannot be used (foreign, corrupt, locked by another process) or a refused query."""
