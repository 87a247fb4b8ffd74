"""The local backend: a pool of worker processes on this machine, the embedded default.

Each worker is a named provider (``local-0``, ``local-1``...) with a private Golem-layout
dir (``work/``, ``output/``) and runs :func:`mltask.provider.run_subtask`, the same entry
point as the Docker image and Golem providers. Workers are long-lived, so the dataset,
splits and imports are paid once per worker, not once per trial. They are forked from a
forkserver that preloaded the provider and the estimator's modules: a worker killed for a
timeout is replaced in milliseconds, and forking never copies the requestor's threads or
open database.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mltask.backends.base import Completion, Slot, SlotBackend
from mltask.protocol import SubtaskDefinition


def _worker_main(conn: Connection, resources_dir: Path, work_dir: Path, output_dir: Path) -> None:
    """Serve subtasks until told to stop; the parent handles Ctrl-C for everyone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from mltask.provider import run_subtask

    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        try:
            run_subtask(work_dir, resources_dir, output_dir)
        except Exception as exc:  # reported to the requestor as this subtask's failure
            conn.send(f"{type(exc).__name__}: {exc}")
        else:
            conn.send(None)


@dataclass
class _Slot(Slot):
    """One provider: a worker process, the pipe to it, and its dirs."""

    process: Any = None
    conn: Connection | None = None


class LocalBackend(SlotBackend):
    name = "local"

    def __init__(self, workers: int | None = None, preload: tuple[str, ...] = ()) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._preload = ["mltask.provider", *preload]
        self._slots: list[_Slot] = []
        self._resources: Path | None = None
        self._ctx = multiprocessing.get_context("forkserver")

    def start(self, resources_dir: Path, scratch_dir: Path) -> None:
        self._ctx.set_forkserver_preload(self._preload)
        self._resources = resources_dir
        self._slots = [_Slot(f"local-{i}", scratch_dir / f"local-{i}") for i in range(self.workers)]
        for slot in self._slots:
            slot.work.mkdir(parents=True, exist_ok=True)
            slot.output.mkdir(parents=True, exist_ok=True)
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        parent, child = self._ctx.Pipe()
        slot.process = self._ctx.Process(
            target=_worker_main, args=(child, self._resources, slot.work, slot.output), name=slot.name, daemon=True
        )
        slot.process.start()
        child.close()
        slot.conn = parent

    def _restart(self, slot: _Slot) -> None:
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join()
        slot.conn.close()
        self._spawn(slot)

    def submit(self, provider: str, subtask: SubtaskDefinition, timeout: float) -> None:
        slot = self._idle_slot(provider)
        if not slot.process.is_alive():  # died while idle (killed, OOM): nothing was lost
            slot.process.join()
            self._restart(slot)
        slot.hand(subtask, timeout)
        try:
            slot.conn.send(subtask.subtask_id)
        except OSError:  # died just now: wait() reports it as this subtask's failure
            pass

    def wait(self, timeout: float) -> list[Completion]:
        busy = [s for s in self._slots if s.subtask is not None]
        if not busy:
            return []
        now = time.monotonic()
        limit = max(0.0, min([timeout] + [s.deadline - now for s in busy]))
        multiprocessing.connection.wait([s.conn for s in busy] + [s.process.sentinel for s in busy], timeout=limit)
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
                error = slot.conn.recv()
            except (EOFError, OSError):  # the pipe closed: the worker is gone
                return Completion(slot.name, subtask, None, self._died(slot))
            return Completion(slot.name, subtask, None if error else slot.output, error)
        if not slot.process.is_alive():
            return Completion(slot.name, subtask, None, self._died(slot))
        if time.monotonic() >= slot.deadline:
            self._restart(slot)
            return Completion(slot.name, subtask, None, f"timed out after {slot.timeout:g} s; worker killed")
        return None

    def _died(self, slot: _Slot) -> str:
        """Why a worker vanished (exit code or signal); it is replaced."""
        slot.process.join(timeout=5)
        code = slot.process.exitcode
        self._restart(slot)
        if code is not None and code < 0:
            return f"worker killed by signal {-code}"
        return f"worker died (exit code {code})"

    def close(self) -> None:
        for slot in self._slots:
            try:
                slot.conn.send(None)
            except (OSError, ValueError):
                pass
        end = time.monotonic() + 2
        for slot in self._slots:
            slot.process.join(timeout=max(0.0, end - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
        self._slots = []
