"""The backend interface: where subtasks run. One narrow strategy, like Optuna's samplers.

A backend owns a set of named providers (worker processes, containers, Golem activities),
runs the provider entry point on them and reports each subtask's end. It knows nothing of
samplers, verification or the store; :mod:`mltask.scheduler` drives any backend the same
way, so local, docker and golem runs share all the policy.
"""

from __future__ import annotations

import abc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mltask.protocol import SUBTASK_FILE, SubtaskDefinition, dumps, write_json_atomic


@dataclass(frozen=True)
class Completion:
    """A subtask that ended on ``provider``: its output dir, or why there is none.

    ``error`` is a fault (a crash, a timeout); ``refused`` says the provider broke the
    protocol outside its result file (an output past its bounds), which is judged like a
    false result.
    """

    provider: str
    subtask: SubtaskDefinition
    output_dir: Path | None
    error: str | None = None
    refused: str | None = None


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

    def hand(self, subtask: SubtaskDefinition, timeout: float) -> None:
        """Give this provider ``subtask``: its dirs hold nothing but the new subtask.json."""
        empty(self.work)
        empty(self.output)
        write_json_atomic(self.work / SUBTASK_FILE, dumps(subtask))
        self.subtask, self.timeout, self.deadline = subtask, timeout, time.monotonic() + timeout


def empty(directory: Path) -> None:
    """Remove what is in a dir but keep the dir (a container's bind mount points at it)."""
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


class Backend(abc.ABC):
    """Runs subtasks on providers; ``submit`` never blocks, ``wait`` collects what ended."""

    name: str
    workers: int  # providers at once

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

    def spare_cores(self) -> int:
        """Cores of the requestor's machine that this backend's providers hold but leave unused now.

        The requestor's re-runs may take them (:meth:`mltask.referee.Referee.lend`): at the end
        of a search the best's final re-run, split by fold, runs on the idle workers' cores
        rather than on one referee process. 0 unless the providers are the requestor's own
        processes (the local backend): docker's containers may run on another daemon
        (``DOCKER_HOST``) and under CPU limits of their own, and Golem providers are other
        machines, so their idleness frees nothing here and the requestor keeps
        ``verification.referee_workers``.
        """
        return 0

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


class SlotBackend(Backend):
    """A backend whose providers are :class:`Slot` s on this machine (processes, containers)."""

    _slots: list

    def idle_providers(self) -> list[str]:
        return [s.name for s in self._slots if s.subtask is None]

    def _idle_slot(self, provider: str) -> Slot:
        slot = next(s for s in self._slots if s.name == provider)
        assert slot.subtask is None, f"{provider} is busy"
        return slot
