"""llama.cpp's OpenAI-compatible HTTP server as a runtime: the path ollama and llamafile wrap.

The in-process adapter (``llamacpp_rt``) calls llama.cpp's server code as a library; this one
starts it as a server, the way an application meets it: a child process (``python -m
labkit.runtimes.llamacpp_server_rt``, which runs ``xllamacpp.Server``, the code of
``llama-server``) listening on 127.0.0.1 at a free port, and every request goes over HTTP to
``/v1/completions`` as a server-sent-event stream. The request body is the in-process one
(``llamacpp_rt.completion_request``), so the two rows differ by the transport alone: HTTP, JSON,
loopback TCP and a second process. That difference is the cost of the server path, measured.

Lifetime (:class:`LlamaServer`), because a server left behind holds a port, threads and memory:

* start: the port is checked first (a port in use is an error that says so), the child is
  started in its own session, then ``GET /health`` is polled until it answers ``ok``, within
  ``startup_timeout`` seconds; a child that exits or does not answer in time is killed and the
  error quotes the end of its log;
* stop (``close()``, ``with``, garbage collection or interpreter exit, whichever comes first):
  the child's stdin is closed, which is its signal to stop; after ``STOP_TIMEOUT_S`` it is
  terminated, then killed; the port is free when ``stop()`` returns;
* a caller that dies without stopping it (killed, crashed) closes the child's stdin too: the
  child waits on nothing else, so it exits on its own;
* every request has a deadline (``request_timeout`` seconds, also per socket read).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from labkit.runtimes.llamacpp_rt import LlamaCppF32, TokenStream

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0


class ServerError(RuntimeError):
    """The llama.cpp server did not start, did not answer, or answered an error (the message
    says which, and quotes its log where that helps)."""


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the OS picks it; the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when a server could not listen on ``host:port`` now (another one holds it).

    With SO_REUSEADDR, as the server binds: connections it closed linger in TIME_WAIT for a
    minute on that port, and they do not stop a new server from listening there.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def post_json(base_url: str, path: str, body: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
    """POST ``body`` as JSON to ``base_url + path``; the reply's JSON (ServerError if not 200)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(base_url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ServerError(f"llama.cpp server: POST {path} -> {exc.code}: {exc.read()[:300]!r}") from exc
    except (TimeoutError, urllib.error.URLError) as exc:
        raise ServerError(f"llama.cpp server at {base_url}: POST {path} got no answer within "
                          f"{timeout:g} s ({exc})") from exc


def tokenize(base_url: str, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
    """llama.cpp's token ids for ``text`` (``POST /tokenize``). ``parse_special``: special tokens
    written in the text (``<|im_start|>``) become their ids, as ``tokenizers`` does."""
    body = {"content": text, "add_special": add_special, "parse_special": parse_special}
    return [int(t) for t in post_json(base_url, "/tokenize", body)["tokens"]]


def _stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """Close stdin (the child's signal to stop), then terminate, then kill; always reaps it."""
    if proc.poll() is None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    elif proc.stdin is not None:
        proc.stdin.close()


class LlamaServer:
    """One llama.cpp server process on 127.0.0.1, spoken to over HTTP. ``start()`` returns when
    it is healthy; ``stop()`` when it is gone."""

    def __init__(
        self, gguf: Path, *, n_ctx: int = 1024, threads: int | None = None, exact: bool = False,
        port: int | None = None, startup_timeout: float = STARTUP_TIMEOUT_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.gguf, self.n_ctx, self.threads, self.exact = Path(gguf), n_ctx, threads, exact
        self.port = port
        self.startup_timeout, self.request_timeout = startup_timeout, request_timeout
        self.proc: subprocess.Popen | None = None
        self.log: Any = None  # the server's stdout and stderr, a temporary file while it runs
        self._finalizer: Any = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> LlamaServer:
        if self.port is None:
            self.port = free_port()
        elif port_in_use(self.port):
            raise ServerError(f"llama.cpp server: {HOST}:{self.port} is already in use "
                              "(another server?); pass port=None for a free one")
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            "w+", prefix=f"labkit-llamacpp-server-{self.port}-", suffix=".log")
        cmd = [sys.executable, "-m", "labkit.runtimes.llamacpp_server_rt", "--gguf", str(self.gguf),
               "--port", str(self.port), "--n-ctx", str(self.n_ctx)]
        cmd += ["--threads", str(self.threads)] if self.threads else []
        cmd += ["--exact"] if self.exact else []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._finalizer = weakref.finalize(self, _stop_process, self.proc)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(f"llama.cpp server exited during start-up (code "
                                  f"{self.proc.returncode}): {self.log_tail()}")
            try:
                status, body = self.request("GET", "/health", timeout=2.0)
                if status == 200 and json.loads(body).get("status") == "ok":
                    return
            except (OSError, http.client.HTTPException, ValueError):
                pass  # not listening yet
            time.sleep(0.05)
        raise ServerError(f"llama.cpp server did not answer /health on {self.base_url} within "
                          f"{self.startup_timeout:g} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        """The last lines the server process wrote (its stdout and stderr)."""
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        """A new connection per request: the server closes one after a streamed response
        (despite its Keep-Alive header), so reusing it would fail; on loopback a connect costs
        tens of microseconds, and it is part of what a client pays."""
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout or self.request_timeout)

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float | None = None) -> tuple[int, bytes]:
        """One request; returns (status, body). Connection errors propagate (OSError)."""
        conn = self._connect(timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stream(self, path: str, body: dict, on_chunk: Callable[[dict], bool]) -> None:
        """POST ``body`` and hand each server-sent event's JSON to ``on_chunk`` (True stops),
        within ``request_timeout`` seconds in all (and per socket read)."""
        deadline = time.monotonic() + self.request_timeout
        conn = self._connect(None)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise ServerError(f"llama.cpp server: POST {path} -> {resp.status}: {resp.read()[:300]!r}")
            for line in resp:
                if time.monotonic() > deadline:
                    raise ServerError(f"llama.cpp server: {path} took over {self.request_timeout:g} s")
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]" or on_chunk(json.loads(payload)):
                    break
        except TimeoutError as exc:  # a socket read waited request_timeout
            raise ServerError(f"llama.cpp server: {path} sent nothing for {self.request_timeout:g} s"
                              ) from exc
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the process (gracefully, then by force) and free its port; safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()  # _stop_process, once
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> LlamaServer:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LlamaCppServer(LlamaCppF32):
    """llama.cpp's HTTP server on the F32 GGUF (F32 cache, as the in-process F32 row), measured
    through HTTP streaming; the same requests as ``llama.cpp-f32``, so the rows compare."""

    name: ClassVar[str] = "llama.cpp-server"

    def _open(self, path: Path, n_ctx: int) -> None:
        self.server = LlamaServer(path, n_ctx=n_ctx, threads=self.threads, exact=self.exact).start()

    def _send(self, request: dict[str, Any], stream: TokenStream) -> None:
        self.server.stream("/v1/completions", request, stream)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def note(self) -> str:  # type: ignore[override]
        """How it was measured. Fixed text: a record's note is part of its identity, so the
        server process's own peak RSS is not written here (the RSS column is the client's)."""
        return ("llama.cpp server (xllamacpp) in its own process on 127.0.0.1, timed through HTTP "
                "streaming (SSE, a connection per request); KV cache F32, flash attention off; "
                "logits compared as log-probabilities; peak RSS: the client's, not the server's")

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server = None


def serve(argv: list[str] | None = None) -> int:
    """The child process: run one llama.cpp server until stdin closes (the parent's stop, or the
    parent's death), then shut it down."""
    import xllamacpp as xlc

    from labkit.runtimes.llamacpp_rt import completion_request, server_params

    ap = argparse.ArgumentParser(prog="python -m labkit.runtimes.llamacpp_server_rt")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--exact", action="store_true")
    args = ap.parse_args(argv)
    params = server_params(Path(args.gguf), n_ctx=args.n_ctx, threads=args.threads,
                           exact=args.exact, port=args.port)
    try:
        server = xlc.Server(params)
    except RuntimeError as exc:
        print(f"llama.cpp server failed to start on {HOST}:{args.port} ({exc}); port in use "
              "or not a GGUF model?", file=sys.stderr, flush=True)
        return 1
    request = {**completion_request([0], 1), "stream": False}
    server.handle_completions(request)  # the loop runs before anything can stop it
    print(f"llama.cpp server ready on {server.listening_address} (pid {os.getpid()})", flush=True)
    sys.stdin.read()  # returns at EOF: the parent closed stdin or is gone
    del server
    return 0


if __name__ == "__main__":
    raise SystemExit(serve())
