"""The docker backend: subtasks run in the real provider image, in containers on this machine.

Each provider (``docker-0``, ``docker-1``...) is one long-lived container running
``mltask-provider --serve``: the requestor writes ``/golem/work/subtask.json`` (a bind
mount) and the provider answers in ``/golem/output``, through the same
:func:`mltask.provider.run_subtask` as every backend, then writes a line to
``/golem/answered``, a pipe the requestor reads without polling the container. One
process per container, not one per subtask: measured in the image, a fresh
``mltask-provider`` per subtask (``docker exec``) spent 1.3 s importing scikit-learn and
loading the data each time, an efficiency of 0.46 on 1 s subtasks and under 0.9 on 10 s ones.

Containers are locked down as an untrusted workload would be: no network, read-only root
filesystem and resources, all capabilities dropped, no privilege escalation, the image's
unprivileged user whatever the image says, a pids limit, a bounded ``/dev/shm``, open
files and log, and the CPU and memory limits of ``options.provider``. Nothing a container
writes reaches the requestor's disk: ``/golem/output`` is a tmpfs of :data:`OUTPUT_BYTES`
and :data:`OUTPUT_FILES` entries, private to the provider's uid, gone with its container.
The requestor reads it through the Docker API (never following a link) and takes only
one regular file, ``result.json`` within its subtask's bound or ``error.txt``; an output
holding anything else (more files, links, a file past its bound, nothing at all after the
provider said it answered) is a protocol breach, judged like a false result: the subtask is
rejected, the provider banned, its container stopped. A subtask past its timeout is ended
by killing its container, which is then replaced; so is a container that dies. Containers
carry a label naming the scratch dir, so a requestor that was killed leaves nothing
running after its resume.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mltask.backends.base import Completion, Slot, SlotBackend, empty
from mltask.definition import ProviderOptions
from mltask.errors import TaskError
from mltask.image import DEFAULT_TAG, docker_client
from mltask.protocol import ERROR_BYTES, ERROR_FILE, RESULT_FILE, SUBTASK_FILE, SubtaskDefinition, result_size_limit

LABEL = "org.mltask.scratch"
PROVIDER_UID = 10001  # the image's provider user (docker/Dockerfile)
OUTPUT = "/golem/output"
ANSWERED = "/golem/answered"
# The output tmpfs holds any honest answer (results are far below their bound, which
# passes this only past ~2000 trials per subtask) and is charged to the container's memory.
OUTPUT_BYTES = 64 * 1024**2
OUTPUT_FILES = 16
_POLL_SECONDS = 0.02
_LIVENESS_SECONDS = 0.5  # how often busy containers are asked whether they still run


class OutputRefused(Exception):
    """A provider's output is not one answer within its bounds: a breach of the protocol."""


@dataclass
class _Slot(Slot):
    """One provider: a container, its dirs, its answer pipe and when to ask next whether it still runs."""

    container: Any = None
    next_liveness: float = 0.0
    answered: int = -1  # read end of the pipe the provider writes a line to after each answer

    @property
    def pipe(self) -> Path:
        return self.root / "answered"


class DockerBackend(SlotBackend):
    name = "docker"

    def __init__(self, workers: int | None = None, provider: ProviderOptions | None = None,
                 image: str | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.limits = provider or ProviderOptions()
        self.image = image or self.limits.image or DEFAULT_TAG
        self._slots: list[_Slot] = []
        self._client: Any = None
        self._resources: Path | None = None
        self._scratch: Path | None = None

    def check(self) -> None:
        import docker

        self._client = docker_client()
        try:
            self._client.images.get(self.image)
        except docker.errors.ImageNotFound:
            raise TaskError(
                "options.provider.image", f"Docker image {self.image!r} is not here; build it with "
                f"`mltask image build --tag {self.image}` (add --base IMAGE where Docker Hub is out of reach)"
            ) from None

    def start(self, resources_dir: Path, scratch_dir: Path) -> None:
        self.check()
        self._resources, self._scratch = resources_dir.resolve(), scratch_dir.resolve()
        self._remove_leftovers()
        self._slots = [_Slot(f"docker-{i}", self._scratch / f"docker-{i}") for i in range(self.workers)]
        for slot in self._slots:
            slot.work.mkdir(parents=True, exist_ok=True)
            slot.output.mkdir(parents=True, exist_ok=True)  # where the requestor puts the answer it read
            slot.pipe.unlink(missing_ok=True)
            os.mkfifo(slot.pipe)
            os.chmod(slot.pipe, 0o622)  # the image's user writes here, whatever our umask
            # Held open for reading all along, so a provider's write never waits; never blocks us.
            slot.answered = os.open(slot.pipe, os.O_RDONLY | os.O_NONBLOCK)
            self._start_container(slot)

    def _remove_leftovers(self) -> None:
        """Containers of an earlier run of this task whose requestor died (kill -9)."""
        for container in self._client.containers.list(all=True, filters={"label": f"{LABEL}={self._scratch}"}):
            _remove(container)

    def _start_container(self, slot: _Slot) -> None:
        from docker.types import DriverConfig, LogConfig, Mount, Ulimit

        output = DriverConfig("local", {"type": "tmpfs", "device": "tmpfs", "o": f"size={OUTPUT_BYTES},nr_inodes="
                                        f"{OUTPUT_FILES},uid={PROVIDER_UID},gid={PROVIDER_UID},mode=0700"})
        slot.container = self._client.containers.run(
            self.image, ["mltask-provider", "--serve", "--notify", ANSWERED], detach=True, network_mode="none",
            mounts=[Mount("/golem/resources", str(self._resources), type="bind", read_only=True),
                    Mount("/golem/work", str(slot.work), type="bind", read_only=True),
                    Mount(ANSWERED, str(slot.pipe), type="bind", read_only=True),  # a pipe: no data lands on disk
                    Mount(OUTPUT, None, type="volume", driver_config=output)],  # anonymous: removed with it
            user=f"{PROVIDER_UID}:{PROVIDER_UID}", nano_cpus=int(self.limits.cpus * 1e9),
            mem_limit=_bytes(self.limits.memory_gib), memswap_limit=_bytes(self.limits.memory_gib), pids_limit=512,
            read_only=True, tmpfs={"/tmp": "size=512m"}, shm_size=64 * 1024**2,
            ulimits=[Ulimit(name="nofile", soft=1024, hard=1024)],
            log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
            cap_drop=["ALL"], security_opt=["no-new-privileges"],
            labels={LABEL: str(self._scratch), "org.mltask.provider": slot.name},
        )

    def _replace(self, slot: _Slot) -> None:
        _remove(slot.container)
        empty(slot.work)  # or the new container would run the abandoned subtask again
        _drain(slot.answered)  # what the old one wrote says nothing about the next subtask
        self._start_container(slot)

    def submit(self, provider: str, subtask: SubtaskDefinition, timeout: float) -> None:
        slot = self._idle_slot(provider)
        if not self._container_running(slot):  # died while idle (killed, OOM): nothing was lost
            self._replace(slot)
        _drain(slot.answered)  # a line before the subtask exists is no answer to it
        slot.hand(subtask, timeout)
        os.chmod(slot.work / SUBTASK_FILE, 0o644)  # readable by the image's user whatever our umask

    def wait(self, timeout: float) -> list[Completion]:
        end = time.monotonic() + timeout
        while True:
            done = [c for c in map(self._check, [s for s in self._slots if s.subtask is not None]) if c]
            now = time.monotonic()
            if done or now >= end or not any(s.subtask for s in self._slots):
                return done
            time.sleep(min(_POLL_SECONDS, max(0.0, end - now)))

    def _check(self, slot: _Slot) -> Completion | None:
        """The slot's subtask if it ended: an answer, a dead container or its deadline."""
        subtask = slot.subtask
        assert subtask is not None
        if _drain(slot.answered):
            slot.subtask = None
            return self._collect(slot, subtask)
        now = time.monotonic()
        if now >= slot.deadline:
            slot.subtask = None
            self._replace(slot)
            return Completion(slot.name, subtask, None, f"timed out after {slot.timeout:g} s; container killed")
        if now >= slot.next_liveness:
            slot.next_liveness = now + _LIVENESS_SECONDS
            if not self._container_running(slot):
                slot.subtask = None
                state = slot.container.attrs.get("State", {})
                why = "out of memory" if state.get("OOMKilled") else f"exit code {state.get('ExitCode')}"
                self._replace(slot)
                return Completion(slot.name, subtask, None, f"container died ({why}); replaced")
        return None

    def _collect(self, slot: _Slot, subtask: SubtaskDefinition) -> Completion:
        """The answer in the provider's output, copied to ``slot.output``; or why there is none to take."""
        import docker

        try:
            stream, _ = slot.container.get_archive(f"{OUTPUT}/.", chunk_size=64 * 1024)
            try:
                name, data = read_answer(stream, result_size_limit(subtask))
            finally:  # Docker holds the container until its archive is read out (at most OUTPUT_BYTES)
                for _ in stream:
                    pass
        except OutputRefused as exc:
            self._replace(slot)  # stopped: what it wrote goes with it
            return Completion(slot.name, subtask, None, refused=f"{exc}; container stopped")
        except docker.errors.APIError as exc:  # gone between its answer and our read
            self._replace(slot)
            return Completion(slot.name, subtask, None, f"its output could not be read ({exc.explanation}); replaced")
        if name == ERROR_FILE:
            error = data.decode("utf-8", "replace").strip()
            return Completion(slot.name, subtask, None, f"mltask-provider: {error[:ERROR_BYTES]}")
        (slot.output / RESULT_FILE).write_bytes(data)
        return Completion(slot.name, subtask, slot.output)

    def _container_running(self, slot: _Slot) -> bool:
        slot.container.reload()
        return slot.container.status == "running"

    def close(self) -> None:
        for slot in self._slots:
            _remove(slot.container)
            if slot.answered >= 0:
                os.close(slot.answered)
        self._slots = []


def read_answer(chunks: Iterable[bytes], limit: int) -> tuple[str, bytes]:
    """The one answer in a tar of a provider's output dir: ``result.json`` (at most ``limit``
    bytes) or ``error.txt``, as (name, content). Anything else is refused, without reading on.
    """
    answer: tuple[str, bytes] | None = None
    with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks)), mode="r|") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name == "." and member.isdir():
                continue
            shown = repr(name[:60])
            if name not in (RESULT_FILE, ERROR_FILE) or answer is not None:
                raise OutputRefused(f"its output holds {shown} besides one answer; a provider writes only "
                                    f"{RESULT_FILE} (or {ERROR_FILE})")
            if not member.isreg():
                raise OutputRefused(f"{name} in its output is not a regular file; links are refused")
            bound = limit if name == RESULT_FILE else ERROR_BYTES
            if member.size > bound:
                raise OutputRefused(f"{name} is larger than the {bound}-byte bound for this subtask")
            reader = tar.extractfile(member)
            assert reader is not None
            answer = (name, reader.read(member.size))
    if answer is None:
        raise OutputRefused("it said it answered, but its output holds no answer")
    return answer


class _ChunkReader(io.RawIOBase):
    """A file over the Docker API's stream of chunks, read only as far as asked."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n


def _drain(fd: int) -> bool:
    """Read what is waiting in a provider's answer pipe; whether there was anything."""
    got = False
    for _ in range(16):  # a provider writing without end cannot keep us here
        try:
            if not os.read(fd, 64 * 1024):
                break
        except BlockingIOError:
            break
        got = True
    return got


def _bytes(gib: float) -> int:
    return int(gib * 1024**3)


def _remove(container: Any) -> None:
    import docker

    if container is None:
        return
    try:
        container.remove(force=True, v=True)  # v: its output tmpfs too
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:  # already being removed
        if "in progress" not in str(exc):
            raise
