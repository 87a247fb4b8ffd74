"""Backends by name: ``local`` (the embedded default), ``docker`` and ``golem``."""

from __future__ import annotations

from mltask.backends.base import Backend, Completion
from mltask.definition import GolemOptions, ProviderOptions
from mltask.errors import TaskError

BACKENDS = ("local", "docker", "golem")


def make_backend(name: str, workers: int | None, *, preload: tuple[str, ...] = (),
                 provider: ProviderOptions | None = None, image: str | None = None,
                 golem: GolemOptions | None = None, bid: float = 1.0) -> Backend:
    """The backend called ``name`` with ``workers`` providers (default: one per CPU).

    ``preload``: modules local workers import before forking; ``provider``: container
    limits and Golem demand; ``image``: the docker image, over ``provider.image``;
    ``golem`` and ``bid``: the Golem market.
    """
    if name == "local":
        from mltask.backends.local import LocalBackend

        return LocalBackend(workers=workers, preload=preload)
    if name == "docker":
        from mltask.backends.docker import DockerBackend

        return DockerBackend(workers=workers, provider=provider, image=image)
    if name == "golem":
        from mltask.backends.golem import GolemBackend

        return GolemBackend(workers=workers, provider=provider, golem=golem, bid=bid)
    raise TaskError("--backend", f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "Completion", "make_backend"]
