"""The single backend switch.

Each op has one definition (``fastmask.ops``) and per-backend implementations
registered here; the pure-PyTorch reference (``"torch"``) is registered for every
op and runs on any device. Choice: the ``backend`` argument, else the
``FASTMASK_BACKEND`` environment variable, else ``"auto"``: CUDA tensors ->
triton, then cuda; CPU tensors -> cpp; otherwise torch. A backend named
explicitly that cannot run raises ``BackendUnavailableError`` with the reason;
nothing falls back silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {}
# name -> callable(device) returning None if the backend can run there, else the reason.
_PROBES: dict[str, Callable[[torch.device], str | None]] = {"torch": lambda device: None}


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here (the message says why)."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _IMPLEMENTATIONS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def register_probe(backend: str, probe: Callable[[torch.device], str | None]) -> None:
    """``probe(device)`` returns None when ``backend`` can run on ``device``, else the reason."""
    _PROBES[backend] = probe


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    probe = _PROBES.get(backend)
    if probe is None:
        return f"the {backend} backend is not part of this build of fastmask"
    return probe(device)


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("FASTMASK_BACKEND", "auto")
    if name != "auto" and name not in BACKENDS:
        source = "backend" if backend is not None else "FASTMASK_BACKEND"
        raise ValueError(f"{source} must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")
    return name


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` for the request ``backend``."""
    name = requested_backend(backend)
    impls = _IMPLEMENTATIONS.get(op, {})
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if candidate in impls and unavailable_reason(candidate, device) is None:
                return candidate
        return "torch"
    reason = unavailable_reason(name, device)
    if reason is None and name not in impls:
        reason = f"it has no implementation of {op!r}"
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run {op!r} on {device}: {reason}")
    return name


def implementation(op: str, backend: str | None, device: torch.device) -> Callable:
    return _IMPLEMENTATIONS[op][resolve(op, backend, device)]


def backend_report(device: torch.device) -> dict[str, str | None]:
    """For each backend: None if it can run on ``device``, else why not."""
    return {name: unavailable_reason(name, device) for name in BACKENDS}
