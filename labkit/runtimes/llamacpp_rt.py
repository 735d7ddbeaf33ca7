"""llama.cpp in this process through ``xllamacpp``, on GGUF files written by ``labkit.export.gguf``.

Why xllamacpp: it is a prebuilt wheel (manylinux x86-64 and aarch64, macOS; MIT) that embeds a
recent llama.cpp with its server, so every fresh machine has llama.cpp in seconds, where
llama-cpp-python compiles llama.cpp at install time (10 to 50 minutes on 2 cores). Its version
names the llama.cpp release it embeds (2026.10.11549: llama.cpp b11549, see
``labkit.core.env.llamacpp_build``).

What its API gives, and how this adapter uses it:

* generation: ``xllamacpp.Server`` runs llama.cpp's server loop (the code of ``llama-server``)
  inside this process, and ``handle_completions(request, callback)`` streams one OpenAI-style
  completion over token ids. A timed run is one such request (:func:`completion_request`:
  greedy, ``top_k`` 1, no prompt cache, so every repeat prefills its prompt); the HTTP adapter
  (``llamacpp_server_rt``) sends the same request over HTTP, so the two rows differ by the
  transport only.
* logits: the API returns log-probabilities, not raw logits. A step that asks for ``n_probs`` =
  the vocabulary gets llama.cpp's own log-softmax of every token's logit (float32, before
  sampling), so ``prefill``/``decode_step`` return those, ``returns_logprobs`` is True and parity
  compares both sides as log-probabilities (``base.parity``). Softmax ignores a per-position
  shift of the logits, so what is compared is all of the logits that can change an output.
  The parity run (``keep_logits``) goes step by step; llama.cpp reuses its cache of the history
  (``cache_prompt``), and each step's token is the argmax, llama.cpp's greedy choice.
  tiny-llama F32: 5e-5 max |d log p| over 64 tokens.
* tokens: the stream names a token's id only beside its probability, and a token that ends
  inside a UTF-8 character (a byte token) is held back and named by nobody: llama.cpp reports
  no probabilities for it. Timed runs count tokens from the stream's usage instead; each
  parity step forces its sampled token to a one-character probe (:func:`next_token_request`).
* timings: wall clock around the call, as for every adapter: TTFT = time to the first streamed
  token; decode = first to last token, spread evenly over the steps (the stream delivers tokens
  in bursts, so per-token gaps are not individual step times).

Settings. The F32 file runs with an F32 KV cache and flash attention off: llama.cpp's default
F16 cache moves tiny-llama's logits by ~1e-2, and its CPU flash attention (on by default,
"auto") by 9e-3 (measured: 9.1e-3 with it, 5.3e-5 without); the F32 row is the "same arithmetic
as torch" check. The F16/Q8_0/Q4_0 rows keep llama.cpp's defaults (F16 cache, flash attention
auto), as llama-server and ollama run them; the note on each record says which. Everywhere:
CPU only (``n_gpu_layers`` 0: the macOS wheel would otherwise use Metal; ``no_op_offload``, or
ggml still runs the ops of a batch of >= 32 tokens on Metal with the weights in host memory),
weights read into memory (not mmap, as every other runtime here holds them), ``n_batch`` =
``n_ubatch`` = 512 so pp512 runs as one batch (llama-bench's default), one slot.

One request runs right after the server starts: its destructor stops the loop with
``terminate()``, and a terminate that comes before the loop has started is lost (observed: a
Server deleted straight after construction hangs in its destructor).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from labkit.runtimes import base
from labkit.runtimes.base import GenerationRun, Runtime, file_bytes

#: llama.cpp's prompt batch (llama-bench's default): pp512 runs as one batch
N_BATCH = 512


class LlamaCppError(RuntimeError):
    """llama.cpp answered a request with an error, or generated another number of tokens."""


def gguf_path(model_dir: Path, file_type: str) -> Path:
    """The cached GGUF file of ``model_dir`` in ``file_type``, written on first use."""
    from labkit.export.gguf import export_gguf

    model_dir = Path(model_dir)
    path = base.cache_dir() / "gguf" / f"{model_dir.name}-{base.weights_key(model_dir)}-{file_type}.gguf"
    if not path.is_file():
        export_gguf(model_dir, path, file_type)
    return path


def server_params(
    path: Path, *, n_ctx: int, threads: int | None = None, exact: bool = False, port: int = 0
) -> Any:
    """The ``xllamacpp.CommonParams`` both llama.cpp adapters start their server with.

    ``exact``: F32 KV cache and no flash attention (the F32 row; see the module docstring).
    ``port`` 0 lets the server pick a free one; it listens on 127.0.0.1 only.
    """
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(path)
    params.n_ctx = int(n_ctx)
    params.n_batch = params.n_ubatch = N_BATCH
    params.n_parallel = 1
    params.n_gpu_layers = 0
    # with Metal, ggml would still offload the ops of a batch of >= 32 tokens to the GPU, weights
    # in host memory and all; keep the CPU rows on the CPU (where the build has the switch)
    if hasattr(params, "no_op_offload"):
        params.no_op_offload = True
    params.load_mode = xlc.llama_load_mode.LLAMA_LOAD_MODE_NONE
    params.cache_ram_mib = 0  # no prompt cache in host memory: each repeat prefills
    params.fit_params = False  # keep n_ctx as asked (fitting may shrink it to free memory)
    params.hostnames = ["127.0.0.1"]
    params.port = int(port)
    params.verbosity = -1
    if threads:
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = int(threads)
    if exact:
        params.cache_type_k = params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return params


def completion_request(prompt: list[int], n_new: int, *, cache_prompt: bool = False) -> dict[str, Any]:
    """A streamed greedy OpenAI completion of ``n_new`` tokens after the token ids ``prompt``.

    Each streamed token carries its id beside its probability after sampling (``n_probs`` 1,
    ``post_sampling_probs``): with ``top_k`` 1 one candidate is left, so that costs no sort.
    ``ignore_eos``: every run generates ``n_new`` tokens (llama.cpp then never samples an
    end-of-generation token); the parity steps take the argmax of the distribution before
    sampling, where EOS is a token like any other, as in the torch reference.
    """
    return {
        "prompt": [int(t) for t in prompt], "max_tokens": int(n_new), "stream": True,
        "temperature": 0.0, "top_k": 1, "ignore_eos": True, "cache_prompt": cache_prompt,
        "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "dry_multiplier": 0.0, "n_probs": 1, "post_sampling_probs": True,
    }


def next_token_request(history: list[int], vocab: int, probe: int, *, cache_prompt: bool) -> dict[str, Any]:
    """One step: every token's log-probability after ``history`` (``n_probs`` = ``vocab``).

    The probabilities are llama.cpp's softmax of the raw logits, before sampling; the sampled
    token is forced to ``probe`` (a one-character token) by a logit bias, which the reported
    probabilities do not include. Why: llama.cpp's server holds back a token that ends inside a
    UTF-8 character (a byte token) and reports no probabilities for it, so an unforced step on
    such a token would answer nothing. The probe is never fed back: the caller appends the
    greedy token (the argmax) to the history.
    """
    request = completion_request(history, 1, cache_prompt=cache_prompt)
    request.update(n_probs=int(vocab), post_sampling_probs=False, logit_bias=[[int(probe), 1e6]])
    return request


class TokenStream:
    """The callback that collects one streamed completion: token ids, arrival times, counts.

    Called with each chunk (a dict, as the OpenAI stream's ``data:`` lines); returns False to go
    on (True on an error chunk). A token that ends inside a UTF-8 character is held back by
    llama.cpp and streamed with the next one *without its id* (see :func:`next_token_request`),
    so ``tokens`` can be shorter than what was generated; the count comes from the final chunk's
    ``usage``, and every time from chunk arrivals.
    """

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.t0 = time.perf_counter()
        self.tokens: list[int] = []
        self.logprobs: list[np.ndarray] = []
        self.times: list[float] = []  # arrival of each chunk that carried tokens or text
        self.generated: int | None = None
        self.error: str | None = None

    def __call__(self, chunk: dict[str, Any]) -> bool:
        now = time.perf_counter()
        if "error" in chunk:
            self.error = str(chunk["error"].get("message", chunk["error"]))
            return True
        choice = chunk["choices"][0]
        entries = (choice.get("logprobs") or {}).get("content") or []
        for entry in entries:
            self.tokens.append(int(entry["id"]))
            if "top_logprobs" in entry:  # probabilities before sampling (next_token_request)
                row = np.full(self.vocab, -np.inf, dtype=np.float32)
                top = entry["top_logprobs"]
                row[[t["id"] for t in top]] = [t["logprob"] for t in top]
                self.logprobs.append(row)
        if entries or choice.get("text"):
            self.times.append(now)
        if chunk.get("usage"):
            self.generated = int(chunk["usage"]["completion_tokens"])
            self.times = self.times or [now]  # nothing streamed before the end: the end
        return False

    def run(self, n_new: int) -> GenerationRun:
        """The greedy run: prefill = time to the first token, decode steps evenly spread."""
        if self.error is not None:
            raise LlamaCppError(f"llama.cpp: {self.error}")
        if self.generated != n_new:
            raise LlamaCppError(f"llama.cpp generated {self.generated} tokens, asked for {n_new}")
        steps = n_new - 1
        decode = [(self.times[-1] - self.times[0]) / steps] * steps if steps else []
        return GenerationRun(self.times[0] - self.t0, decode, self.tokens, self.logprobs)


class LlamaCpp(Runtime):
    """llama.cpp (the xllamacpp wheel's CPU build) on one GGUF file type, in this process."""

    name: ClassVar[str] = "llama.cpp"
    file_type: ClassVar[str] = "F32"
    returns_logprobs: ClassVar[bool] = True

    def __init__(self, threads: int | None = None, n_ctx: int = 1024) -> None:
        self.threads = threads
        self.n_ctx = n_ctx
        self.dtype = {"F32": "float32", "F16": "float16"}.get(self.file_type, self.file_type.lower())
        self.device = "cpu"
        self.server: Any = None
        self.probe = 0
        self._history: list[int] = []

    @classmethod
    def available(cls) -> str | None:
        for mod in ("xllamacpp", "gguf"):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} not installed (a labkit dependency): pip install {mod}"
        return None

    @property
    def exact(self) -> bool:
        """F32 cache, no flash attention: the F32 file computes what torch computes."""
        return self.file_type == "F32"

    def load(self, model_dir: Path) -> None:
        from labkit.models.config import read_config

        self._check_available()
        config = read_config(Path(model_dir))
        self.vocab = int(config["vocab_size"])
        self.path = gguf_path(Path(model_dir), self.file_type)
        self._open(self.path, min(self.n_ctx, int(config["max_position_embeddings"])))
        self.timed_generate([0], 1)  # the server's loop is running now (see the module docstring)
        self.probe = self.tokenize("a", add_special=False)[0]  # see next_token_request

    @property
    def note(self) -> str:  # type: ignore[override]
        """The settings the numbers were taken with (shown beside every record)."""
        cache = "F32, flash attention off" if self.exact else "F16, flash attention auto (defaults)"
        return (f"xllamacpp in process; KV cache {cache}; weights read into memory (no mmap); "
                "logits compared as log-probabilities (llama.cpp's API returns those)")

    def _open(self, path: Path, n_ctx: int) -> None:
        import xllamacpp as xlc

        self.server = xlc.Server(server_params(path, n_ctx=n_ctx, threads=self.threads,
                                               exact=self.exact))

    def _send(self, request: dict[str, Any], stream: TokenStream) -> None:
        self.server.handle_completions(request, stream)

    def _complete(self, request: dict[str, Any]) -> TokenStream:
        if self.server is None:
            raise RuntimeError(f"{self.name}: load() first")
        stream = TokenStream(self.vocab)
        self._send(request, stream)
        return stream

    def timed_generate(self, prompt: list[int], n_new: int, keep_logits: bool = False) -> GenerationRun:
        """Greedy ``n_new`` tokens. Timed: one streamed request (llama.cpp runs the decode
        loop). ``keep_logits``: step by step (prefill, decode_step), each answering every
        token's log-probability, the tokens the argmax of each (llama.cpp's greedy choice)."""
        if n_new < 1:
            raise ValueError(f"n_new must be >= 1, got {n_new}")
        if keep_logits:
            return super().timed_generate(prompt, n_new, keep_logits=True)
        return self._complete(completion_request(prompt, n_new)).run(n_new)

    def _step(self, cache_prompt: bool) -> np.ndarray:
        request = next_token_request(self._history, self.vocab, self.probe, cache_prompt=cache_prompt)
        return self._complete(request).run(1).logits[0]

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Log-probabilities of the next token after ``ids`` (a fresh request, no cache)."""
        self._history = [int(t) for t in ids]
        return self._step(cache_prompt=False)

    def decode_step(self, token: int) -> np.ndarray:
        """Log-probabilities after one more token; the server reuses its cache of the history."""
        self._history.append(int(token))
        return self._step(cache_prompt=True)

    @property
    def base_url(self) -> str:
        """Where this llama.cpp server answers HTTP (the in-process one listens on 127.0.0.1 too)."""
        return self.server.listening_address

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama.cpp's token ids for ``text``, from its server's ``/tokenize`` (the Python API has
        no tokenizer call). ``add_special``: BOS where the GGUF says the tokenizer adds it."""
        from labkit.runtimes.llamacpp_server_rt import tokenize

        return tokenize(self.base_url, text, add_special=add_special, parse_special=parse_special)

    def model_bytes(self) -> int | None:
        return file_bytes(self.path)

    def close(self) -> None:
        """Stop the server (its destructor ends the loop thread and closes its port)."""
        self.server = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LlamaCppF32(LlamaCpp):
    name: ClassVar[str] = "llama.cpp-f32"
    file_type: ClassVar[str] = "F32"


class LlamaCppF16(LlamaCpp):
    name: ClassVar[str] = "llama.cpp-f16"
    file_type: ClassVar[str] = "F16"


class LlamaCppQ8_0(LlamaCpp):  # noqa: N801 (the ggml type's name)
    name: ClassVar[str] = "llama.cpp-q8_0"
    file_type: ClassVar[str] = "Q8_0"


class LlamaCppQ4_0(LlamaCpp):  # noqa: N801
    name: ClassVar[str] = "llama.cpp-q4_0"
    file_type: ClassVar[str] = "Q4_0"
