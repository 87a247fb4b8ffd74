"""Backends by name: ``local`` now; ``docker`` and ``golem`` register here as they land."""

from __future__ import annotations

from mltask.backends.base import Backend, Completion
from mltask.errors import TaskError

BACKENDS = ("local",)


def make_backend(name: str, workers: int | None, **options: object) -> Backend:
    """The backend called ``name`` with ``workers`` providers (default: one per CPU)."""
    if name == "local":
        from mltask.backends.local import LocalBackend

        return LocalBackend(workers=workers, **options)
    raise TaskError("--backend", f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "Completion", "make_backend"]
