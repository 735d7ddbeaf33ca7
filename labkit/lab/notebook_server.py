"""`make lab` (`labkit lab`): JupyterLab on notebooks/, for root and other users alike.

Why not plain ``jupyter lab notebooks/``: as root, which is how many containers run, Jupyter
refuses to start without ``--allow-root``; and the URL with its token scrolls away among the
server's log lines. This command passes ``--allow-root`` only to root, picks a free port, makes
the token itself (handed over in ``JUPYTER_TOKEN``, so it never shows in ``ps``), puts the lab's
``labkit`` kernel first (the interpreter ``labkit reproduce`` runs the notebooks with), keeps
tqdm's notice about a missing ipywidgets out of the kernels' outputs, and says which URL to open
before JupyterLab takes over the process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import socket
import sys
from pathlib import Path

from labkit.core import paths

DEFAULT_PORT = 8888


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def free_port(host: str = "127.0.0.1", start: int = DEFAULT_PORT, tries: int = 100) -> int:
    """The first port from ``start`` that nothing listens on at ``host``."""
    for port in range(start, start + tries):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {start}..{start + tries - 1} on {host}")


def command(notebooks: Path, host: str, port: int, *, as_root: bool) -> list[str]:
    """The JupyterLab command line (the token travels in the environment)."""
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.ip={host}",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={notebooks}"]
    return [*argv, "--allow-root"] if as_root else argv


def url(host: str, port: int, token: str) -> str:
    """Where to point a browser; a server on every interface is reached here on 127.0.0.1."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}/lab?token={token}"


def environment(token: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: the labkit kernel first, the token, tqdm's notice filtered."""
    from labkit.lab.reproduce import IPROGRESS_NOTICE, kernel_env

    env = kernel_env(dict(os.environ if base is None else base))
    warnings = ",".join(w for w in (env.get("PYTHONWARNINGS"), IPROGRESS_NOTICE) if w)
    return {**env, "JUPYTER_TOKEN": token, "PYTHONWARNINGS": warnings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labkit lab", description=__doc__.split("\n")[0])
    parser.add_argument("--ip", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0 to reach it from outside a container)")
    parser.add_argument("--port", type=int, help=f"port (default: the first free one from {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("jupyterlab") is None:
        print("JupyterLab is not installed here: .venv/bin/pip install -e '.[lab]' (make lab does it)")
        return 2
    from labkit.lab.reproduce import ensure_kernel

    ensure_kernel()
    port = args.port or free_port(args.ip)
    token = secrets.token_hex(24)
    cmd = command(paths.notebooks_dir(), args.ip, port, as_root=is_root())
    print(f"JupyterLab on {paths.notebooks_dir()}{' (as root)' if is_root() else ''}:\n"
          f"  open {url(args.ip, port, token)}\n  Ctrl-C stops it.", flush=True)
    os.execve(cmd[0], cmd, environment(token))  # JupyterLab takes over: its Ctrl-C, its exit code
    return 0  # not reached
