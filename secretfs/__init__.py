"""secretfs: secrets as files (a per-process FUSE mount) and as environment variables.

The Python API, imported lazily so ``import secretfs`` stays cheap::

    from secretfs import SecretsManager, Secret, SecretRef
    from secretfs import resolve_refs   # secretfs:// references inside a loaded config
"""

from __future__ import annotations

__version__ = "0.1.0"

_PUBLIC = {
    "SecretsManager": "secretfs.manager",
    "SyncSecretsManager": "secretfs.manager",
    "Secret": "secretfs.model",
    "SecretRef": "secretfs.model",
    "SecretMetadata": "secretfs.model",
    "RotationPolicy": "secretfs.model",
    "GeneratorSpec": "secretfs.model",
    "Label": "secretfs.model",
    "SecretfsError": "secretfs.errors",
    "resolve_refs": "injector.resolve",
}


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'secretfs' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["__version__", *_PUBLIC]
