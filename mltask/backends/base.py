"""The backend interface: where subtasks run. One narrow strategy, like Optuna's samplers.

A backend owns a set of named providers (worker processes, containers, Golem activities),
runs the provider entry point on them and reports each subtask's end. It knows nothing of
samplers, verification or the store; :mod:`mltask.scheduler` drives any backend the same
way, so local, docker and golem runs share all the policy.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

from mltask.protocol import SubtaskDefinition


@dataclass(frozen=True)
class Completion:
    """A subtask that ended on ``provider``: its output dir, or why there is none."""

    provider: str
    subtask: SubtaskDefinition
    output_dir: Path | None
    error: str | None = None


class Backend(abc.ABC):
    """Runs subtasks on providers; ``submit`` never blocks, ``wait`` collects what ended."""

    name: str

    @abc.abstractmethod
    def start(self, resources_dir: Path, scratch_dir: Path) -> None:
        """Bring providers up; ``resources_dir`` is sent (or mounted) read-only."""

    @abc.abstractmethod
    def idle_providers(self) -> list[str]:
        """Providers ready for a subtask now."""

    @abc.abstractmethod
    def submit(self, provider: str, subtask: SubtaskDefinition, timeout: float) -> None:
        """Start ``subtask`` on an idle ``provider``; it is killed after ``timeout`` seconds."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> list[Completion]:
        """Subtasks that ended within ``timeout`` seconds (possibly none)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop every provider; safe to call twice and after errors."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
