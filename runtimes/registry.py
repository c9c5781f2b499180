"""Which backend runs an artifact: discovery, the default choice, and a clear error when one cannot run.

An artifact holds one folder per exported backend (`manifest["backends"]`). A backend runs when the artifact holds it
AND its runtime module imports (onnxruntime, litert, executorch wheels). The default is the first of
`DEFAULT_ORDER` that satisfies both; asking for one that does not is an error listing what is available and why
the others are not.

A backend module (`edge_gemma.runtimes.<module>`) provides either a function `open_backend(artifact, *, threads)`
or a `Backend` subclass whose `name` is the backend's name and whose constructor is `(artifact, *, threads=None)`.

No torch here.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass

from edge_gemma.artifact import Artifact

from .base import Backend, BackendError

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "DEFAULT_ORDER", "BackendStatus", "backend_status", "open_backend", "resolve_backend"]

# backend name -> (runtime module, the artifact folder/manifest key it reads)
BACKENDS: dict[str, tuple[str, str]] = {
    "onnx": ("edge_gemma.runtimes.onnx", "onnx"),
    "litert": ("edge_gemma.runtimes.litert", "litert"),
    "executorch": ("edge_gemma.runtimes.executorch", "executorch"),
    "litert-lm": ("edge_gemma.runtimes.litert_lm", "litert"),
}
DEFAULT_ORDER = ("onnx", "litert", "executorch")


@dataclass(frozen=True, kw_only=True)
class BackendStatus:
    name: str
    in_artifact: bool
    importable: bool
    reason: str  # why it cannot run ("" when it can)

    @property
    def usable(self) -> bool:
        return self.in_artifact and self.importable


def _import(name: str):
    module, _ = BACKENDS[name]
    try:
        return importlib.import_module(module), ""
    except ImportError as exc:  # the module, or its runtime wheel, is missing
        return None, f"{module} cannot be imported ({exc})"


def backend_status(artifact: Artifact) -> list[BackendStatus]:
    """Every known backend, whether the artifact holds it and whether its runtime imports."""
    out = []
    for name, (_, key) in BACKENDS.items():
        held = key in artifact.backends
        mod, why = _import(name) if held else (None, "")
        if not held:
            why = f"the artifact has no {key!r} backend (exported: {sorted(artifact.backends) or 'none'})"
        out.append(BackendStatus(name=name, in_artifact=held, importable=mod is not None, reason=why))
    return out


def _describe(statuses: list[BackendStatus]) -> str:
    usable = [s.name for s in statuses if s.usable]
    lines = [f"available: {', '.join(usable) if usable else 'none'}"]
    lines += [f"  {s.name}: {s.reason}" for s in statuses if not s.usable]
    return "\n".join(lines)


def resolve_backend(artifact: Artifact, name: str | None = None) -> str:
    """The backend to run: `name` if it can run, else an error; without a name the first usable of DEFAULT_ORDER."""
    statuses = backend_status(artifact)
    if name is None:
        for candidate in DEFAULT_ORDER:
            if any(s.name == candidate and s.usable for s in statuses):
                return candidate
        raise BackendError(f"{artifact.root}: no backend of this artifact can run here\n{_describe(statuses)}")
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    status = next(s for s in statuses if s.name == name)
    if not status.usable:
        raise BackendError(f"{artifact.root}: backend {name!r} cannot run: {status.reason}\n{_describe(statuses)}")
    return name


def open_backend(artifact: Artifact, name: str | None = None, *, threads: int | None = None) -> Backend:
    """Open the chosen (or default) backend on `artifact`."""
    name = resolve_backend(artifact, name)
    module, _ = _import(name)
    if hasattr(module, "open_backend"):
        return module.open_backend(artifact, threads=threads)
    classes = [
        obj for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Backend) and obj is not Backend and getattr(obj, "name", None) == name
    ]
    if not classes:
        raise BackendError(f"{module.__name__}: defines no Backend subclass named {name!r} and no open_backend()")
    cls = classes[0]
    params = inspect.signature(cls).parameters
    kwargs = {"threads": threads} if "threads" in params else {}
    log.info("opening %s backend on %s", name, artifact.root)
    return cls(artifact, **kwargs)
