"""Backends by name: ``local`` (the embedded default), ``docker`` and ``golem``."""

from __future__ import annotations

from mltask.backends.base import Backend, Completion
from mltask.definition import TaskDefinition
from mltask.errors import TaskError

BACKENDS = ("local", "docker", "golem")


def make_backend(name: str, workers: int | None, definition: TaskDefinition, *, image: str | None = None,
                 preload: tuple[str, ...] = ()) -> Backend:
    """The backend called ``name`` with ``workers`` providers (default: one per CPU) for a task.

    The task gives the provider resources (``options.provider``), the Golem market
    (``options.golem``, ``bid``); ``image`` overrides the docker image, ``preload`` names
    modules the local workers import before forking.
    """
    opts = definition.options
    if name == "local":
        from mltask.backends.local import LocalBackend

        return LocalBackend(workers=workers, preload=preload)
    if name == "docker":
        from mltask.backends.docker import DockerBackend

        return DockerBackend(workers=workers, provider=opts.provider, image=image)
    if name == "golem":
        from mltask.backends.golem import GolemBackend

        return GolemBackend(workers=workers, provider=opts.provider, golem=opts.golem, bid=definition.bid)
    raise TaskError("--backend", f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "Completion", "make_backend"]
