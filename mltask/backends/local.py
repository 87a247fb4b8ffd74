"""The local backend: a pool of worker processes on this machine, the embedded default.

Each worker is a named provider (``local-0``, ``local-1``...) with a private Golem-layout
dir (``work/``, ``output/``) and runs :func:`mltask.provider.run_subtask`, the same entry
point as the Docker image and Golem providers. Workers are long-lived, so the dataset,
splits and imports are paid once per worker, not once per trial. They are forked from a
server process of our own that preloaded the provider and the estimator's modules
(:mod:`mltask.backends.forkserver`): a worker killed for a timeout is replaced in
milliseconds, forking never copies the requestor's threads or open database, and workers
depend neither on the requestor's ``__main__`` (a script without a ``__main__`` guard,
``python -c``, stdin, a REPL, a notebook) nor on what is in the working directory.
"""

from __future__ import annotations

import json
import multiprocessing.connection
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from mltask.backends.base import Completion, Slot, SlotBackend
from mltask.backends.forkserver import ForkServer
from mltask.protocol import SubtaskDefinition


@dataclass
class _Slot(Slot):
    """One provider: a worker process, the pipe to it, and its dirs."""

    pid: int = 0
    conn: Connection | None = None


class LocalBackend(SlotBackend):
    name = "local"

    def __init__(self, workers: int | None = None, preload: tuple[str, ...] = ()) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._preload = ["mltask.provider", *preload]
        self._slots: list[_Slot] = []
        self._resources: Path | None = None
        self._server = ForkServer(self._preload)
        self._offered: set[str] = set()  # idle at the last idle_providers()

    def idle_providers(self) -> list[str]:
        idle = super().idle_providers()
        self._offered = set(idle)
        return idle

    def spare_cores(self) -> int:
        """Workers offered work at the last :meth:`idle_providers` and given none, still idle: their
        cores are this machine's and nothing wants them (one that just finished is not counted: it
        is offered work first)."""
        return sum(s.subtask is None and s.name in self._offered for s in self._slots)

    def start(self, resources_dir: Path, scratch_dir: Path) -> None:
        self._resources = resources_dir
        self._slots = [_Slot(f"local-{i}", scratch_dir / f"local-{i}") for i in range(self.workers)]
        for slot in self._slots:
            slot.work.mkdir(parents=True, exist_ok=True)
            slot.output.mkdir(parents=True, exist_ok=True)
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        slot.pid, slot.conn = self._server.fork("mltask.backends.forkserver:serve_subtasks",
                                                resources=str(self._resources), work=str(slot.work),
                                                output=str(slot.output))

    def _replace(self, slot: _Slot) -> None:
        """Kill the slot's worker if it still runs, and fork a fresh one."""
        self._server.kill(slot.pid)
        slot.conn.close()
        self._spawn(slot)

    def submit(self, provider: str, subtask: SubtaskDefinition, timeout: float) -> None:
        slot = self._idle_slot(provider)
        self._offered.discard(provider)  # given work: not spare, even once it has finished it
        if slot.conn.poll():  # an idle worker says nothing: this is the end of a worker that died idle
            self._replace(slot)
        slot.hand(subtask, timeout)
        try:
            slot.conn.send_bytes(json.dumps(subtask.subtask_id).encode())
        except OSError:  # died just now: wait() reports it as this subtask's failure
            pass

    def wait(self, timeout: float) -> list[Completion]:
        busy = [s for s in self._slots if s.subtask is not None]
        if not busy:
            return []
        now = time.monotonic()
        limit = max(0.0, min([timeout] + [s.deadline - now for s in busy]))
        multiprocessing.connection.wait([s.conn for s in busy], timeout=limit)
        done = []
        for slot in busy:
            completion = self._check(slot)
            if completion is not None:
                slot.subtask = None
                done.append(completion)
        return done

    def _check(self, slot: _Slot) -> Completion | None:
        subtask = slot.subtask
        assert subtask is not None
        if slot.conn.poll():
            try:
                error = json.loads(slot.conn.recv_bytes())
            except (EOFError, OSError):  # the pipe closed: the worker is gone
                return Completion(slot.name, subtask, None, self._died(slot))
            return Completion(slot.name, subtask, None if error else slot.output, error)
        if time.monotonic() >= slot.deadline:
            self._replace(slot)
            return Completion(slot.name, subtask, None, f"timed out after {slot.timeout:g} s; worker killed")
        return None

    def _died(self, slot: _Slot) -> str:
        """Why a worker vanished (exit code or signal); it is replaced."""
        code = self._server.exit_code(slot.pid, timeout=5)
        self._replace(slot)
        if code is not None and code < 0:
            return f"worker killed by signal {-code}"
        return f"worker died (exit code {code})"

    def close(self) -> None:
        started = [s for s in self._slots if s.conn is not None]
        for slot in started:
            try:
                slot.conn.send_bytes(json.dumps(None).encode())
            except OSError:
                pass
        end = time.monotonic() + 2
        for slot in started:
            self._server.exit_code(slot.pid, timeout=max(0.0, end - time.monotonic()))
            self._server.kill(slot.pid)
            slot.conn.close()
        self._slots = []
        self._server.close()
