"""`make lab` starts JupyterLab for root and other users, says where to look, and stops cleanly.

The command `make lab` runs (`python -m labkit lab`) is started in its own process group, the
URL it prints is read, the server is polled on 127.0.0.1 until it answers with that token, and
the group is stopped; no process of it may be left behind. As root (how this lab's CI and many
containers run) that checks --allow-root; as root it also runs once as the unprivileged user
``nobody``, with a fresh HOME, which is the other case.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from labkit.core import paths
from labkit.lab import notebook_server

REPO = paths.root()


def test_command_allows_root_only_for_root():
    nb = Path("/lab/notebooks")
    as_root = notebook_server.command(nb, "127.0.0.1", 8890, as_root=True)
    plain = notebook_server.command(nb, "127.0.0.1", 8890, as_root=False)
    assert "--allow-root" in as_root and "--allow-root" not in plain
    assert as_root[:3] == [sys.executable, "-m", "jupyterlab"]
    assert "--ServerApp.port=8890" in plain and "--ServerApp.port_retries=0" in plain
    assert "--ServerApp.root_dir=/lab/notebooks" in plain and "--no-browser" in plain
    assert not any("token" in arg.lower() for arg in plain), "the token travels in the environment"


def test_url_and_environment():
    assert notebook_server.url("127.0.0.1", 8890, "abc") == "http://127.0.0.1:8890/lab?token=abc"
    assert notebook_server.url("0.0.0.0", 8890, "abc").startswith("http://127.0.0.1:8890/")
    env = notebook_server.environment("tok", {"PYTHONWARNINGS": "error::DeprecationWarning"})
    assert env["JUPYTER_TOKEN"] == "tok"
    assert env["PYTHONWARNINGS"] == "error::DeprecationWarning,ignore:IProgress not found"
    assert env["JUPYTER_PATH"].startswith(str(Path(sys.prefix)))  # the labkit kernel comes first


def test_free_port_is_free():
    port = notebook_server.free_port(start=20000)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of the group lives, under another user
        return True
    return True


def _start_and_stop(preexec=None, env=None) -> str:
    """Start `python -m labkit lab`, wait until the server answers, stop it; return its banner."""
    port = notebook_server.free_port(start=18888)
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "lab", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=preexec, env=env)
    banner = ""
    try:
        while "Ctrl-C" not in banner:
            line = proc.stdout.readline()
            assert line, f"labkit lab exited before printing its URL:\n{banner}"
            banner += line
        found = re.search(r"open (http://127\.0\.0\.1:(\d+)/lab\?token=(\w+))", banner)
        assert found and int(found.group(2)) == port, banner
        status = f"http://127.0.0.1:{port}/api/status"
        request = urllib.request.Request(status, headers={"Authorization": f"token {found.group(3)}"})
        deadline, answer = time.monotonic() + 180, None
        while answer is None and time.monotonic() < deadline:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{banner}"
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    answer = json.loads(resp.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, f"no answer on {status} within 180 s"
        assert "started" in answer, answer
    finally:
        pgid = proc.pid
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=30)
            pytest.fail("JupyterLab did not stop on SIGTERM")
        proc.stdout.close()
        for _ in range(50):  # the server's children (none expected) must go with it
            if not _group_alive(pgid):
                break
            time.sleep(0.2)
        assert not _group_alive(pgid), "a process of `labkit lab` outlived it"
    return banner


@pytest.mark.slow
def test_make_lab_starts_answers_and_stops():
    pytest.importorskip("jupyterlab", reason="needs JupyterLab (pip install -e '.[lab]')")
    banner = _start_and_stop()
    assert ("(as root)" in banner) == notebook_server.is_root()


@pytest.mark.slow
def test_make_lab_as_an_unprivileged_user(tmp_path):
    pytest.importorskip("jupyterlab", reason="needs JupyterLab (pip install -e '.[lab]')")
    if not notebook_server.is_root():
        pytest.skip("already checked as this non-root user by the test above")
    import pwd

    nobody = pwd.getpwnam("nobody")
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    tmp_path.chmod(0o755)

    def drop():
        os.setgid(nobody.pw_gid)
        os.setgroups([])
        os.setuid(nobody.pw_uid)

    try:
        subprocess.run([sys.executable, "-c", "import labkit"], preexec_fn=drop, check=True,
                       capture_output=True, cwd=tmp_path)
    except (PermissionError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"user nobody cannot run this Python here ({sys.executable}): {exc}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "LABKIT"))}
    env.update(HOME=str(home), USER="nobody", XDG_CACHE_HOME=str(home / ".cache"),
               XDG_DATA_HOME=str(home / ".local" / "share"), PYTHONDONTWRITEBYTECODE="1")
    banner = _start_and_stop(preexec=drop, env=env)
    assert "(as root)" not in banner
