"""llama.cpp's server as a runtime: it starts, answers, and always stops, leaving nothing behind.

"Nothing behind" is checked directly: the server's process is gone (reaped, or at least not
running), its port can be bound again, this process has no child and no more threads than
before. The cases: a normal stop, a caller that raises (an error, Ctrl-C), a caller that is
killed outright, a port in use, a server that cannot load its model, one that does not answer
in time, a request that takes too long. All on a tiny random model; nothing here times speed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from labkit.runtimes.llamacpp_rt import completion_request
from labkit.runtimes.llamacpp_server_rt import LlamaServer, ServerError, port_in_use, tokenize


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64) with the shipped tokenizer, as an F32 GGUF."""
    from conftest import random_llama_with_shipped_tokenizer

    from labkit.export.gguf import export_gguf

    folder = random_llama_with_shipped_tokenizer(tmp_path_factory.mktemp("server") / "tiny", seed=3)
    return export_gguf(folder, folder.parent / "tiny-F32.gguf", "F32")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _assert_nothing_left(pid: int, port: int, threads_before: int) -> None:
    assert _gone(pid), f"server process {pid} still running"
    assert not port_in_use(port), f"port {port} still bound"
    assert psutil.Process().children() == []
    assert threading.active_count() == threads_before


def test_starts_answers_and_stops_cleanly(gguf):
    threads = threading.active_count()
    server = LlamaServer(gguf, n_ctx=128, threads=1, exact=True).start()
    pid, port = server.proc.pid, server.port
    assert port_in_use(port) and not _gone(pid)
    assert server.request("GET", "/health")[0] == 200
    assert tokenize(server.base_url, "def f(x):", add_special=False)
    chunks = []
    server.stream("/v1/completions", completion_request([0, 5, 6], 3), lambda c: chunks.append(c) and False)
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    server.stop()
    _assert_nothing_left(pid, port, threads)
    server.stop()  # a second stop is harmless


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_stops_when_the_caller_fails_or_is_interrupted(gguf, exc):
    threads = threading.active_count()
    with pytest.raises(exc), LlamaServer(gguf, n_ctx=128, threads=1) as server:
        pid, port = server.proc.pid, server.port
        raise exc("the caller failed")
    _assert_nothing_left(pid, port, threads)


def test_exits_when_its_caller_is_killed(gguf, tmp_path):
    """The caller dies by SIGKILL (no cleanup runs): the server sees its stdin close and exits."""
    script = textwrap.dedent(f"""
        import os, signal
        from labkit.runtimes.llamacpp_server_rt import LlamaServer
        s = LlamaServer({str(gguf)!r}, n_ctx=128, threads=1).start()
        print(s.proc.pid, s.port, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    caller = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=180)
    assert caller.returncode == -signal.SIGKILL, caller.stderr
    pid, port = (int(v) for v in caller.stdout.split())
    deadline = time.monotonic() + 30
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), "the server outlived its caller"
    while port_in_use(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not port_in_use(port)
    # what a killed caller cannot clean up: the temporary file that held the server's log
    for log in Path(tempfile.gettempdir()).glob(f"labkit-llamacpp-server-{port}-*.log"):
        log.unlink()


def test_a_port_in_use_is_a_clear_error(gguf):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = LlamaServer(gguf, port=port)
        with pytest.raises(ServerError, match=f"127.0.0.1:{port} is already in use"):
            server.start()
        assert server.proc is None  # nothing was started


def test_a_server_that_cannot_load_its_model_says_so(tmp_path):
    threads = threading.active_count()
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but not really" * 10)
    server = LlamaServer(bad, startup_timeout=120)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="exited during start-up.*failed to start"):
        server.start()
    assert time.monotonic() - t0 < 120
    _assert_nothing_left(server.proc.pid, server.port, threads)


def test_a_server_that_does_not_answer_in_time_is_stopped(gguf):
    threads = threading.active_count()
    server = LlamaServer(gguf, startup_timeout=0.01)
    with pytest.raises(ServerError, match=r"did not answer /health .* within 0.01 s"):
        server.start()
    _assert_nothing_left(server.proc.pid, server.port, threads)


def test_a_request_that_takes_too_long_is_cut_off(gguf):
    with LlamaServer(gguf, n_ctx=256, threads=1, request_timeout=1e-3) as server:
        with pytest.raises(ServerError, match="llama.cpp server: /v1/completions"):
            server.stream("/v1/completions", completion_request([0], 200), lambda c: False)


def test_in_process_server_frees_its_port_and_threads(gguf, tmp_path, monkeypatch):
    """The in-process adapter's server listens on 127.0.0.1 too: close() (also on Ctrl-C) frees
    the port and joins its threads. xllamacpp keeps one process-wide thread after its first
    server, so the thread count is compared across two servers' lifetimes."""
    from labkit import runtimes

    folder = gguf.parent / "tiny"
    monkeypatch.setenv("LABKIT_RUNTIME_CACHE", str(tmp_path / "cache"))
    tasks = []
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt), runtimes.get("llama.cpp-f32", threads=1) as rt:
            rt.load(folder)
            port = int(rt.base_url.rsplit(":", 1)[1])
            assert port_in_use(port)
            raise KeyboardInterrupt
        assert not port_in_use(port)
        tasks.append(len(os.listdir("/proc/self/task")) if Path("/proc/self/task").is_dir() else 0)
    assert tasks[0] == tasks[1]
