"""``mltask app``: bind, print the URL with its access token, open the browser, serve.

As Jupyter does: a fresh random token per start, printed once inside the URL; the browser
gets it as a cookie on the first request. The server binds 127.0.0.1 unless told otherwise;
another address is taken only when given explicitly, with a warning, since whoever reaches
the port with the token can start code on this machine.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
import threading
import time
import webbrowser
from pathlib import Path

from mltask.errors import TaskError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8686
_PORT_TRIES = 20


def serve(root: Path, host: str = DEFAULT_HOST, port: int | None = None, open_browser: bool = True,
          max_upload_mb: float = 100.0) -> None:
    """Run the app until Ctrl-C; searches it started go on running."""
    try:
        import uvicorn

        from mltask.app.web import Settings, create_app
    except ImportError as exc:
        raise TaskError("app", f"the app needs its extra ({exc.name} is missing); install it with "
                        "pip install -e '.[app]'") from None
    if max_upload_mb <= 0:
        raise TaskError("--max-upload-mb", "must be positive, e.g. 100")
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    token = secrets.token_urlsafe(24)
    app = create_app(Settings(root=root, token=token, port=bound, host=host,
                              max_upload_bytes=int(max_upload_mb * 1e6)))
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/tasks?token={token}"
    if not _is_loopback(host):
        print(f"WARNING: serving on {host}, reachable from other machines; anyone with the URL below can start code "
              "on this machine. Use the default 127.0.0.1 unless you mean it.", file=sys.stderr, flush=True)
    print(f"mltask app: tasks under {root.resolve()}", flush=True)
    print(f"open this URL (it carries the access token): {url}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    if open_browser:
        threading.Thread(target=_open_when_up, args=(server, url), daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl-C, then raises it again
        pass
    finally:
        sock.close()
    print("mltask app stopped; searches it started go on (`mltask app` again shows them)", flush=True)


def _bind(host: str, port: int | None) -> socket.socket:
    """A listening socket; without ``--port``, the first free one from 8686 (as Jupyter picks from 8888)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = [port] if port is not None else [DEFAULT_PORT + i for i in range(_PORT_TRIES)]
    last: OSError | None = None
    for candidate in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.listen(128)
        sock.set_inheritable(False)
        return sock
    raise TaskError("--port", f"cannot listen on {host}:{port if port is not None else DEFAULT_PORT} "
                    f"({last.strerror if last else 'no port'}); choose another with --port N")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _open_when_up(server: object, url: str) -> None:
    """Open the URL once the server answers, where there is a browser with a screen to show it."""
    while not getattr(server, "started", False):
        time.sleep(0.1)
    graphical = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if not graphical:
        print("no graphical browser here; open the URL above in one", flush=True)
        return
    try:
        if not webbrowser.open(url):
            print("no browser found; open the URL above in one", flush=True)
    except webbrowser.Error:
        print("no browser found; open the URL above in one", flush=True)
