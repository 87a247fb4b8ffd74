"""The local workers' fork server, and the loop each worker runs.

Why not :mod:`multiprocessing`: its ``spawn`` and ``forkserver`` start methods prepare every
child from the requestor's ``__main__`` (``spawn.prepare`` re-runs the main script as
``__mp_main__``, or fails when ``__main__`` is ``<stdin>``), so a script that calls
``run_task`` without an ``if __name__ == "__main__"`` guard started the search again in
every worker. And its fork server runs ``python -c``, which puts the working directory
first on the import path: a folder named ``mltask/`` there replaced mltask in every worker.
``fork`` would copy the requestor's threads and open database.

So the requestor starts one server process of its own (``python -c`` with a fixed
bootstrap): it takes the requestor's import path minus the working directory (kept only
when the requestor's own mltask comes from there), checks it imports the same mltask as
the requestor, preloads the provider and the estimator's modules, and then forks a worker
per request, which runs the loop the request names (an mltask function, such as
:func:`serve_subtasks`, given the connection to the requestor and JSON arguments).
Workers never see the requestor's ``__main__``, so a script without a guard,
``python -c``, stdin, a REPL, IPython or a notebook kernel all work the same (the first four
in the tests); a worker killed for a timeout is replaced in milliseconds, its imports done.

The server and the requestor talk over a Unix socket pair: a request is one JSON line
carrying the requestor's end of a new socket pair for the worker (``SCM_RIGHTS``); the
server answers ``{"pid": N}`` and reports ``{"exited": N, "code": C}`` when a worker ends
(``C`` < 0: killed by signal ``-C``). Workers receive a subtask id and answer ``null`` or
an error text, as JSON. When the requestor goes away, even by ``kill -9``, the server sees
the end of its socket, kills its workers and exits; workers see the end of theirs and exit.
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import mltask
from mltask.errors import TaskError

_BOOTSTRAP = (
    "import sys; sys.path[:] = {path!r}; "  # first: nothing may be imported from the working directory
    # the requestor handles Ctrl-C for everyone; SIGINT was blocked from birth (see ForkServer._start) until now
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.pthread_sigmask(signal.SIG_UNBLOCK, "
    "{{signal.SIGINT}}); "
    "from mltask.backends.forkserver import serve; serve({fd}, {mltask_file!r}, {preload!r})"
)
_REPLY_SECONDS = 60.0  # the server imports scikit-learn before its first answer


def worker_path() -> list[str]:
    """The requestor's import path without the working directory, unless mltask comes from it."""
    root = Path(mltask.__file__).resolve().parent.parent
    cwd = Path.cwd().resolve()
    return [p for p in sys.path if Path(p or ".").resolve() != cwd or cwd == root]


class _ServerGone(Exception):
    pass


class ForkServer:
    """The requestor's handle on the server process that forks its local workers.

    Each worker ends with one :meth:`kill` (a no-op for one already gone), which also
    forgets it.
    """

    def __init__(self, preload: list[str]) -> None:
        self._preload = preload
        self._process: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._exits: dict[int, int] = {}

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        code = _BOOTSTRAP.format(path=worker_path(), fd=theirs.fileno(), mltask_file=mltask.__file__,
                                 preload=self._preload)
        # Ctrl-C reaches the whole process group: one arriving while the server still imported
        # `site`, before its bootstrap ignores SIGINT, killed it with a KeyboardInterrupt traceback.
        # A blocked signal stays blocked across fork and exec (only this thread's mask changes).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            with theirs:
                self._process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                                 pass_fds=[theirs.fileno()])
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._sock, self._buffer, self._exits = ours, b"", {}

    def fork(self, target: str, **arguments: str) -> tuple[int, Connection]:
        """A new worker running ``target(connection, **arguments)``: its pid and the connection to it.

        ``target`` is ``"mltask.module:function"``; the worker exits when the function returns.
        """
        if not target.startswith("mltask."):
            raise ValueError(f"workers run mltask functions only, not {target!r}")
        if self._process is None or self._process.poll() is not None:  # not started, or died: (re)start
            self.close()
            self._start()
        assert self._sock is not None
        ours, theirs = socket.socketpair()
        request = {"target": target, "arguments": arguments}
        with theirs:
            try:
                socket.send_fds(self._sock, [json.dumps(request).encode() + b"\n"], [theirs.fileno()])
                pid = self._read(lambda m: "pid" in m, _REPLY_SECONDS)["pid"]
            except (OSError, _ServerGone):
                ours.close()
                raise TaskError("--backend", f"the local workers' server stopped ({self._ended()}); its error is "
                                "printed above") from None
            except TimeoutError:
                ours.close()
                raise TaskError("--backend", f"the local workers' server did not answer in {_REPLY_SECONDS:g} s; "
                                "is the machine overloaded?") from None
        return pid, Connection(ours.detach())

    def exit_code(self, pid: int, timeout: float) -> int | None:
        """How worker ``pid`` ended (negative: the signal that killed it); ``None`` if unknown after ``timeout``."""
        if pid not in self._exits:
            try:
                self._read(lambda m: m.get("exited") == pid, timeout)
            except (TimeoutError, _ServerGone):
                return None
        return self._exits[pid]

    def kill(self, pid: int) -> None:
        """Make sure worker ``pid`` is gone, and forget it."""
        if pid not in self._exits:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # ended and reaped; its report is on the way
                pass
            self.exit_code(pid, 5.0)
        self._exits.pop(pid, None)

    def _read(self, wanted: Any, timeout: float) -> dict[str, Any]:
        """Messages from the server until one is ``wanted``; exit reports on the way are kept."""
        if self._sock is None:
            raise _ServerGone
        end = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                message = json.loads(line)
                if "exited" in message:
                    self._exits[message["exited"]] = message["code"]
                if wanted(message):
                    return message
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                raise _ServerGone
            self._buffer += data

    def _ended(self) -> str:
        assert self._process is not None
        try:
            return f"exit code {self._process.wait(timeout=5)}"
        except subprocess.TimeoutExpired:
            return "it closed its socket"

    def close(self) -> None:
        """Stop the server; it kills workers still running. Safe to call twice."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def serve(fd: int, mltask_file: str, preload: list[str]) -> None:
    """The server process: preload, then fork a worker per request until the requestor goes."""
    if os.path.realpath(mltask.__file__) != os.path.realpath(mltask_file):
        sys.exit(f"mltask workers imported {mltask.__file__}, the requestor {mltask_file}; check PYTHONPATH")
    for module in preload:
        try:
            __import__(module)
        except ImportError:  # the trials that need it fail with the provider's own clear error
            pass
    control = socket.socket(fileno=fd)
    wake_r, wake_w = socket.socketpair()  # SIGCHLD wakes the loop to reap and report workers
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    workers: set[int] = set()
    buffer, fds = b"", []
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is wake_r:
                    while _drain(wake_r):
                        pass
                    for pid, code in _reap():
                        workers.discard(pid)
                        _send(control, {"exited": pid, "code": code})
                    continue
                data, received, _, _ = socket.recv_fds(control, 65536, 16)
                if not data:
                    return
                buffer += data
                fds += received
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    request, conn_fd = json.loads(line), fds.pop(0)
                    pid = os.fork()
                    if pid == 0:
                        for resource in (selector, control, wake_r, wake_w):
                            resource.close()
                        for other in fds:
                            os.close(other)
                        signal.set_wakeup_fd(-1)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        _worker_process(conn_fd, request)
                    os.close(conn_fd)
                    workers.add(pid)
                    _send(control, {"pid": pid})
    except OSError:  # the requestor is gone
        pass
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    control.sendall(json.dumps(message).encode() + b"\n")


def _drain(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(4096))
    except BlockingIOError:
        return False


def _reap() -> list[tuple[int, int]]:
    ended = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended.append((pid, os.waitstatus_to_exitcode(status)))


def _worker_process(conn_fd: int, request: dict[str, Any]) -> NoReturn:
    """A forked worker's whole life: run its loop, flush, exit (never return into the server's loop)."""
    code = 0
    try:
        module, _, function = request["target"].partition(":")
        getattr(importlib.import_module(module), function)(Connection(conn_fd), **request["arguments"])
    except BaseException:  # whatever it was, this process must end here
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def serve_subtasks(conn: Connection, resources: str, work: str, output: str) -> None:
    """A local provider: serve subtasks in these dirs until told to stop or the requestor goes away."""
    from mltask.provider import run_subtask

    resources_dir, work_dir, output_dir = Path(resources), Path(work), Path(output)
    while True:
        try:
            message = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if message is None:
            return
        try:
            run_subtask(work_dir, resources_dir, output_dir)
        except Exception as exc:  # reported to the requestor as this subtask's failure
            answer = f"{type(exc).__name__}: {exc}"
        else:
            answer = None
        try:
            conn.send_bytes(json.dumps(answer).encode())
        except OSError:
            return
