"""Registers hf_distill's model types with transformers' Auto classes, without importing transformers early.

`import hf_distill` must stay light (no torch, no transformers). So registration waits for transformers' own
`transformers.models.auto.modeling_auto` to be imported (which `from transformers import AutoModelForCausalLM`
does) and runs right after it; if transformers' Auto classes are already loaded, it runs at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

TRIGGER = "transformers.models.auto.modeling_auto"
"""The module whose import triggers the registration."""


def register_model_types() -> None:
    """Register the model types of `hf_distill.models` with `AutoConfig` / `AutoModelForCausalLM` (idempotent).

    A failure (e.g. a transformers version without one of the base families) is a warning, never an import error.
    """
    try:
        from .models.bitnet_sub_norm import register

        register()
    except Exception as err:  # noqa: BLE001 - a registration problem must not break the user's imports
        warnings.warn(f"hf_distill could not register its model types with transformers: {err}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """A one-shot finder: lets the normal finders load `TRIGGER`, then registers right after it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            register_model_types()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if transformers' Auto classes are loaded, else as soon as they are."""
    if TRIGGER in sys.modules:
        register_model_types()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
