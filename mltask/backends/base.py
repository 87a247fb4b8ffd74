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


@dataclass
class Slot:
    """A provider on this machine: its private Golem-layout dirs and the subtask it runs."""

    name: str
    root: Path
    subtask: SubtaskDefinition | None = None
    deadline: float = 0.0
    timeout: float = 0.0

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def output(self) -> Path:
        return self.root / "output"


class Backend(abc.ABC):
    """Runs subtasks on providers; ``submit`` never blocks, ``wait`` collects what ended."""

    name: str

    def check(self) -> None:  # noqa: B027 - most backends have nothing to check
        """Fail fast, before a task writes any state, if this backend cannot run (no daemon...)."""

    @abc.abstractmethod
    def start(self, resources_dir: Path, scratch_dir: Path) -> None:
        """Bring providers up; ``resources_dir`` is sent (or mounted) read-only."""

    def expecting_providers(self) -> bool:
        """Whether providers may still come (a market being searched) when none is idle.

        Raises :class:`~mltask.errors.TaskError` once the backend knows none will come.
        """
        return False

    def costs(self) -> dict[str, object]:
        """What running the subtasks cost, for the results (empty where nothing is paid)."""
        return {}

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
