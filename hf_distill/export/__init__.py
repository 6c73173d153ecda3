"""Exports of trained students: BitNet QAT checkpoints, packed 1.58-bit safetensors, and GGUF.

Imported lazily: `gguf` is only needed for the GGUF export.
"""

import importlib as _importlib

_LAZY = {
    "export_qat": "hf_distill.export.qat",
    "export_packed": "hf_distill.export.packed",
    "export_gguf": "hf_distill.export.gguf",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_distill.export' has no attribute {name!r}")
