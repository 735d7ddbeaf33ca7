"""The Swift port (swift/): build it, run its CLI, and make the reference data it is checked against.

Why this module: the port earns trust the way llm.c's test_gpt2 does. PyTorch (transformers'
LlamaForCausalLM / PhiForCausalLM in float32, the reference) writes a versioned dump
(:mod:`labkit.ports.refdump`); the Swift test target reads it and fails outside stated tolerances; and
the Python side runs the ``lmport`` CLI and compares its logits with the same reference. This
module holds the plumbing for all three, so the tests and notebook 04 share one code path:

* :func:`available` says why the port cannot run here (no Swift 6 toolchain, no OpenBLAS), or
  None; :func:`xctest_unavailable` says why ``swift test`` cannot (on macOS XCTest ships with
  Xcode, not with the Command Line Tools).
* :func:`build` runs ``swift build`` once per process (SwiftPM caches in ``swift/.build``), or
  returns the prebuilt CLI named by ``$LABKIT_LMPORT`` (a host with no Swift toolchain, such as
  the lab's GPU host, runs a CLI built here with ``--static-swift-stdlib``).
* :func:`run` runs the CLI and parses its tokens, tok/s and dumps.
* :func:`reference` computes a :class:`~labkit.ports.refdump.RefDump` with PyTorch.
* :func:`prepare_fixtures` writes tiny random Llama (GQA) and Phi folders plus their dumps, and
  the shipped tiny-llama's dump when it exists, into the folder ``swift test`` reads through
  the ``LMPORT_FIXTURES`` environment variable.
* :func:`convert_weights` stores one model at another precision, for comparing the two.

Notebook 04's parity tables, speed comparison and figures are in
:mod:`labkit.studies.swift_port_parity`. torch and transformers are imported inside the
functions that need them; every file goes through :mod:`labkit.core.files`.
"""

from __future__ import annotations

import ctypes.util
import inspect
import json
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labkit.core import files, paths, preflight, tolerances
from labkit.models.config import read_config
from labkit.models.loader import read_safetensors_header, weight_files
from labkit.ports import refdump

SWIFT_DIR = Path(__file__).resolve().parents[2] / "swift"
FIXTURES_ENV = "LMPORT_FIXTURES"
FIXTURES_VERSION = 1
CLI_NAME = "lmport"
#: a prebuilt ``lmport`` to run instead of building one (no toolchain needed where it is set)
PREBUILT_ENV = "LABKIT_LMPORT"

# The acceptance (the Swift test target states the same numbers): logits within float32
# reordering noise over the first LOGIT_STEPS steps, and every greedy token of GREEDY_STEPS
# equal to PyTorch's, so a user of the port reads the very text PyTorch would write.
LOGIT_TOL = float(tolerances.OTHER_RUNTIME)
LOGIT_STEPS = 64
GREEDY_STEPS = 256

_built: dict[bool, Path] = {}


# --- availability and build ------------------------------------------------------------------


def available() -> str | None:
    """None when the port can be built and run here; otherwise the reason, and how to fix it.

    On macOS ``/usr/bin/swift`` exists on every Mac (a shim of xcode-select), so the toolchain is
    asked for its version: Package.swift needs Swift 6 (Xcode 16 or its Command Line Tools).
    """
    from labkit.core import env

    if os.environ.get(PREBUILT_ENV):
        return _prebuilt_reason(Path(os.environ[PREBUILT_ENV]))
    reason = env.swift_toolchain_reason()
    if reason is not None:
        return reason
    if not (SWIFT_DIR / "Package.swift").is_file():
        return f"{SWIFT_DIR / 'Package.swift'} is missing (the Swift package is not in this checkout)"
    if platform.system() == "Darwin":
        return None  # Accelerate ships with macOS
    if ctypes.util.find_library("openblas") is None:
        return "OpenBLAS is missing: apt-get install -y libopenblas-dev"
    headers = [Path("/usr/include/cblas.h"), Path("/usr/local/include/cblas.h")]
    headers += list(Path("/usr/include").glob("*-linux-gnu/cblas.h"))
    if not any(h.exists() for h in headers):
        return "cblas.h is missing: apt-get install -y libopenblas-dev"
    return None


def _prebuilt_reason(binary: Path) -> str | None:
    """None when ``$LABKIT_LMPORT`` names an executable file, else what is wrong with it."""
    if not binary.is_file():
        return f"{PREBUILT_ENV}={binary}: no such file (expected a prebuilt {CLI_NAME} binary)"
    if not os.access(binary, os.X_OK):
        return f"{PREBUILT_ENV}={binary}: not executable (chmod +x it)"
    return None


def _require_available() -> None:
    reason = available()
    if reason is not None:
        raise RuntimeError(f"the Swift port cannot run here: {reason}")


def build(release: bool = True) -> Path:
    """Build the package (``swift build``) once per process; return the ``lmport`` binary.

    SwiftPM rebuilds only what changed, in ``swift/.build``; a second call in the same process
    returns the cached path without running SwiftPM at all.
    """
    if release in _built:
        return _built[release]
    _require_available()
    if os.environ.get(PREBUILT_ENV):  # checked by available(): a release build made elsewhere
        return Path(os.environ[PREBUILT_ENV])
    config = "release" if release else "debug"
    env = _developer_env()  # the toolchain swift_test uses, so SwiftPM reuses this build
    proc = subprocess.run(
        ["swift", "build", "-c", config, "--product", CLI_NAME],
        cwd=SWIFT_DIR,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"swift build -c {config} failed in {SWIFT_DIR} (exit {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    bin_dir = subprocess.run(
        ["swift", "build", "-c", config, "--show-bin-path"],
        cwd=SWIFT_DIR,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    binary = Path(bin_dir) / CLI_NAME
    if not binary.is_file():
        raise RuntimeError(f"swift build reported success but {binary} does not exist")
    _built[release] = binary
    return binary


XCODE_FIX = ("install Xcode 16+ from the App Store, then: "
             "sudo xcode-select -s /Applications/Xcode.app/Contents/Developer")


def xctest_unavailable() -> str | None:
    """None where ``swift test`` can run here, else why not.

    XCTest comes with Xcode, not with the Command Line Tools (what Homebrew installs): there
    ``swift build`` works and ``swift test`` fails with "no such module 'XCTest'". An Xcode that
    is installed but not selected is used through ``DEVELOPER_DIR`` (:func:`_developer_env`).
    """
    from labkit.core import env

    reason = available()
    if reason is not None or platform.system() != "Darwin":
        return reason
    info = env.xcode_info()
    if info.get("xctest"):
        return None
    xcode = preflight.parse_version(info.get("xcode"))
    if info.get("xcode_app") and xcode and xcode >= (16,):
        return None  # installed, not selected: swift_test points DEVELOPER_DIR at it
    found = f"Xcode {info['xcode']}" if info.get("xcode") else "the Command Line Tools only"
    return f"needs Xcode 16+ (XCTest is not in the Command Line Tools; found {found}): {XCODE_FIX}"


def _developer_env() -> dict[str, str]:
    """The environment for SwiftPM: on macOS, an installed Xcode when the selected developer
    folder (``xcode-select -p``) is the Command Line Tools, which lack XCTest."""
    from labkit.core import env as lab_env

    environ = dict(os.environ)
    if platform.system() == "Darwin" and "DEVELOPER_DIR" not in environ:
        info = lab_env.xcode_info()
        if not info.get("xctest") and info.get("xcode_app"):
            environ["DEVELOPER_DIR"] = f"{info['xcode_app']}/Contents/Developer"
    return environ


def swift_test(fixtures: str | os.PathLike[str], release: bool = True) -> subprocess.CompletedProcess:
    """Run ``swift test`` with ``LMPORT_FIXTURES`` pointing at ``fixtures``; returns the process.

    Release mode shares the optimised build with :func:`build` (the tests use only the public
    API, so they need no ``@testable`` debug build). Raises RuntimeError with the reason where
    XCTest is missing (:func:`xctest_unavailable`).
    """
    reason = xctest_unavailable()
    if reason is not None:
        raise RuntimeError(f"swift test cannot run here: {reason}")
    env = dict(_developer_env(), **{FIXTURES_ENV: str(Path(fixtures).resolve())})
    cmd = ["swift", "test"] + (["-c", "release"] if release else [])
    return subprocess.run(cmd, cwd=SWIFT_DIR, env=env, capture_output=True, text=True)


# --- running the CLI ---------------------------------------------------------------------------


@dataclass
class SwiftRun:
    """What one ``lmport`` run printed and dumped."""

    prompt_tokens: list[int]
    tokens: list[int]
    decode_tok_s: float | None
    prefill_s: float
    decode_s: float
    load_s: float
    blas: str
    threads: int | None
    logits: np.ndarray | None = None  # [steps, vocab] when dumped
    hidden: np.ndarray | None = None  # [layers, positions, hidden] when dumped
    note: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int | None = None  # the CLI process's own ru_maxrss (wait4)


def port_blas(system: str | None = None) -> str:
    """The BLAS the port is built against here: Accelerate on macOS (BLAS.swift's
    ``#if canImport(Accelerate)``), OpenBLAS elsewhere. Every run's JSON names it too
    (``SwiftRun.blas``); this answers without a run, for records made from timings alone."""
    return "Accelerate" if (system or platform.system()) == "Darwin" else "OpenBLAS"


def blas_thread_env(threads: int) -> dict[str, str]:
    """The environment that caps the BLAS at ``threads``: OpenBLAS reads OPENBLAS_NUM_THREADS;
    Accelerate has no thread-count call before macOS 15's BLASSetThreading, but vecLib reads
    VECLIB_MAXIMUM_THREADS at start (its AMX/SME matrix units are shared, not threads)."""
    n = str(int(threads))
    return {"OPENBLAS_NUM_THREADS": n, "VECLIB_MAXIMUM_THREADS": n}


def _run_measured(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str, int]:
    """Run ``cmd`` to the end: (exit status, stdout, stderr, its peak RSS in bytes).

    The peak is the process's own (``os.wait4``), not ``RUSAGE_CHILDREN``, which also holds the
    ``swift build`` run earlier in the same process (SwiftPM's peak, not the CLI's). On Linux a
    child's ru_maxrss starts at its parent's size at fork, so it is an upper bound there.
    """
    import sys
    import threading

    with (tempfile.TemporaryFile("w+", encoding="utf-8") as out,
          tempfile.TemporaryFile("w+", encoding="utf-8") as err):
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        expired = threading.Event()
        timer = threading.Timer(timeout, lambda: (expired.set(), proc.kill()))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if expired.is_set():
            raise subprocess.TimeoutExpired(cmd, timeout)
        out.seek(0)
        err.seek(0)
        scale = 1 if sys.platform == "darwin" else 1024
        return proc.returncode, out.read(), err.read(), int(usage.ru_maxrss * scale)


def _ids(tokens: list[int] | np.ndarray, what: str) -> str:
    ids = [int(t) for t in tokens]
    if not ids or min(ids) < 0:
        raise ValueError(f"{what}: expected a non-empty list of token ids >= 0, got {ids[:8]}")
    return ",".join(map(str, ids))


def run(
    model_dir: str | os.PathLike[str],
    tokens: list[int] | np.ndarray,
    max_new: int,
    dump: str | os.PathLike[str] | bool | None = None,
    threads: int | None = None,
    *,
    dump_hidden: bool = False,
    force: list[int] | np.ndarray | None = None,
    timeout: float = 600,
) -> SwiftRun:
    """Greedy-generate ``max_new`` tokens after ``tokens`` with the Swift CLI.

    ``dump``: a path for the [steps, vocab] logits .npy (kept), or True for a temporary one;
    either way the logits come back in ``.logits``. ``dump_hidden`` also returns the hidden state
    after every layer. ``force`` feeds those tokens instead of the port's own (teacher forcing).
    ``threads`` caps the BLAS threads (:func:`blas_thread_env`: OpenBLAS through its call and
    variable, Accelerate through VECLIB_MAXIMUM_THREADS); ``.threads`` says what was applied and
    ``.note`` how.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json)")
    if max_new < 1:
        raise ValueError(f"max_new: expected >= 1, got {max_new}")
    binary = build(release=True)
    with tempfile.TemporaryDirectory(prefix="lmport-") as tmp:
        cmd = [str(binary), "--model", str(model_dir), "--tokens", _ids(tokens, "tokens")]
        cmd += ["--max-new", str(max_new), "--json"]
        logits_path: Path | None = None
        if dump is True:
            logits_path = Path(tmp) / "logits.npy"
        elif dump:
            logits_path = Path(dump)
        if logits_path is not None:
            cmd += ["--dump", str(logits_path)]
        hidden_path = Path(tmp) / "hidden.npy"
        if dump_hidden:
            cmd += ["--dump-hidden", str(hidden_path)]
        if force is not None:
            cmd += ["--force", _ids(force, "force")]
        if threads is not None:
            cmd += ["--threads", str(int(threads))]
        env = dict(os.environ, **(blas_thread_env(threads) if threads is not None else {}))
        code, stdout, stderr, peak = _run_measured(cmd, env, timeout)
        if code != 0:
            raise RuntimeError(f"lmport failed (exit {code}): {stderr.strip()}")
        info = json.loads(stdout.strip().splitlines()[-1])
        blas_threads, note = _applied_threads(info, threads)
        return SwiftRun(
            prompt_tokens=info["prompt_tokens"],
            tokens=info["tokens"],
            decode_tok_s=info.get("decode_tok_s"),
            prefill_s=info["prefill_s"],
            decode_s=info["decode_s"],
            load_s=info["load_s"],
            blas=info["blas"],
            threads=blas_threads,
            logits=np.load(logits_path) if logits_path is not None else None,
            hidden=np.load(hidden_path) if dump_hidden else None,
            note=note,
            raw=info,
            peak_rss_bytes=peak,
        )


def _applied_threads(info: dict[str, Any], threads: int | None) -> tuple[int | None, str | None]:
    """(BLAS threads applied, a note) from the CLI's JSON: OpenBLAS reports its count; the CLI
    cannot ask Accelerate, which was capped through VECLIB_MAXIMUM_THREADS (the CLI's own note,
    "--threads was not applied", predates that and is replaced)."""
    if info.get("blas") != "Accelerate" or threads is None:
        return info.get("blas_threads"), info.get("note")
    return int(threads), (f"Accelerate capped at {int(threads)} thread(s) by "
                          "VECLIB_MAXIMUM_THREADS; its AMX/SME units are shared, not threads")


# --- the PyTorch reference ---------------------------------------------------------------------


def _hf_class(model_dir: Path) -> Any:
    """transformers' class for the folder's architecture (never trust_remote_code)."""
    from transformers import LlamaForCausalLM, PhiForCausalLM

    kind = read_config(model_dir).get("model_type")
    if kind == "llama":
        return LlamaForCausalLM
    if kind == "phi":
        return PhiForCausalLM
    raise ValueError(f"{model_dir / 'config.json'}: model_type {kind!r}; expected 'llama' or 'phi'")


def load_reference_model(model_dir: str | os.PathLike[str]) -> Any:
    """transformers' model for ``model_dir`` in float32 (weights upcast), eager attention, eval."""
    import torch

    model_dir = Path(model_dir)
    weight_files(model_dir)  # refuses a folder without safetensors weights, naming it
    cls = _hf_class(model_dir)
    model = cls.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", use_safetensors=True
    )
    return model.eval()


def weights_dtype(model_dir: str | os.PathLike[str]) -> str:
    """The dtype the folder's safetensors store (float32, float16, bfloat16; 'mixed' if several)."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    found: set[str] = set()
    for f in weight_files(Path(model_dir)):
        header = read_safetensors_header(f)
        found |= {names.get(v["dtype"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}
    return found.pop() if len(found) == 1 else "mixed"


class _LayerCapture:
    """The residual stream after each chosen decoder layer, captured with forward hooks while
    the block runs, so its meaning does not depend on transformers' output_hidden_states
    conventions. ``stacked()``: [layers, positions, hidden] float32."""

    def __init__(self, model: Any, layers: list[int]) -> None:
        self.model, self.layers = model, layers
        self.captured: dict[int, list[Any]] = {i: [] for i in layers}

    def _hook(self, index: int) -> Any:
        import torch

        def save(_module: Any, _inputs: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            self.captured[index].append(h[0].detach().to(torch.float32).clone())

        return save

    def __enter__(self) -> _LayerCapture:
        layers = self.model.model.layers
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def stacked(self) -> np.ndarray:
        import torch

        return np.stack([torch.cat(self.captured[i]).numpy() for i in self.layers])


def _decode(
    model: Any, prompt: list[int] | np.ndarray, steps: int, force: list[int] | np.ndarray | None
) -> np.ndarray:
    """[steps, vocab] float32 logits: prefill ``prompt``, then one token per step through the
    KV cache (as the port does), fed greedily or from ``force``."""
    import torch

    # transformers >= 5.2x names the cache argument `cache`; earlier, `past_key_values`.
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    logits: list[np.ndarray] = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[int(t) for t in prompt]], dtype=torch.long), use_cache=True)
        for step in range(steps):
            if step > 0:
                fed = int(force[step - 1]) if force is not None else int(np.argmax(logits[-1]))
                out = model(input_ids=torch.tensor([[fed]]), **{cache_arg: out[1]}, use_cache=True)
            logits.append(out.logits[0, -1].to(torch.float32).numpy().copy())
    return np.stack(logits)


def reference(
    model_dir: str | os.PathLike[str],
    prompt: list[int] | np.ndarray,
    steps: int,
    layers: list[int] | None = None,
    force: list[int] | np.ndarray | None = None,
    model: Any = None,
) -> refdump.RefDump:
    """Greedy decoding with transformers in float32, recording what the port is checked against:
    each step's logits and the hidden state after each of ``layers`` (all by default).
    ``force`` feeds given tokens instead of the greedy ones (teacher forcing); ``model``, an
    already loaded :func:`load_reference_model`, saves loading it again.
    """
    import torch
    import transformers

    model_dir = Path(model_dir)
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if model is None:
        model = load_reference_model(model_dir)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    if any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"layers: expected indices in 0..{n_layers - 1}, got {layers}")
    if force is not None and len(force) < steps - 1:
        raise ValueError(f"force: {len(force)} tokens given, {steps - 1} needed for {steps} steps")
    with _LayerCapture(model, layers) as capture:
        logits = _decode(model, prompt, steps, force)
    top2 = np.sort(logits, axis=1)[:, -2:]
    meta = {
        "arch": model.config.model_type,
        "dtype": weights_dtype(model_dir),
        "compute_dtype": "float32",
        "steps": steps,
        "teacher_forced": force is not None,
        "source": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "min_top2_margin": float((top2[:, 1] - top2[:, 0]).min()),
    }
    return refdump.RefDump(
        prompt_tokens=np.asarray(prompt, dtype=np.int32),
        layer_indices=layers,
        hidden=capture.stacked(),
        logits=logits,
        greedy_tokens=np.argmax(logits, axis=1).astype(np.int32),
        meta=meta,
    )


# --- tiny random models and fixtures -------------------------------------------------------------


def _randomize_norms_and_biases(model: Any, seed: int) -> None:
    """Give norm weights and biases non-trivial values, so a port that drops one fails the test
    (transformers initialises them to exactly one and zero)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def _save(model: Any, out: Path, dtype: str) -> Path:
    """save_pretrained into ``out`` (safetensors) with weights cast to ``dtype``."""
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in torch_dtype:
        raise ValueError(f"dtype: expected one of {sorted(torch_dtype)}, got {dtype!r}")
    with files.atomic_dir(out) as tmp:
        model.to(torch_dtype[dtype]).save_pretrained(tmp, safe_serialization=True)
    model.to(torch.float32)
    return out


def tiny_llama(
    out: str | os.PathLike[str],
    dtype: str = "float32",
    seed: int = 0,
    *,
    tie: bool = False,
    bias: bool = False,
    rope_theta: float = 10000.0,
    legacy_config: bool = False,
) -> Path:
    """A random 3-layer Llama with grouped-query attention (4 query heads, 2 key/value heads).

    Weights are drawn with std 0.2 (not transformers' 0.02) so next-token logits are spread out
    and greedy choices are decided by clear margins, not by float rounding. ``legacy_config``
    rewrites config.json the way Llama 2 ships it (top-level rope_theta, rope_scaling null).
    """
    out = random_llama(
        out,
        dtype,
        seed,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        layers=3,
        heads=4,
        kv_heads=2 if not tie else 4,
        max_positions=512,
        tie=tie,
        bias=bias,
        rope_theta=rope_theta,
        init_std=0.2,
    )
    if legacy_config:
        cfg = read_config(out)
        rope = cfg.pop("rope_parameters", {})
        cfg["rope_theta"] = rope.get("rope_theta", rope_theta)
        cfg["rope_scaling"] = None
        files.atomic_write_text(out / "config.json", json.dumps(cfg, indent=2))
    return out


def random_llama(
    out: str | os.PathLike[str],
    dtype: str = "float32",
    seed: int = 0,
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    max_positions: int,
    tie: bool = False,
    bias: bool = False,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    init_std: float = 0.02,
) -> Path:
    """A random transformers LlamaForCausalLM of the given shape, saved as safetensors."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
        initializer_range=init_std,
    )
    return random_model(out, config, dtype, seed)


def tiny_phi(out: str | os.PathLike[str], dtype: str = "float32", seed: int = 0) -> Path:
    """A random 2-layer Phi with Phi-2's shape of attention: 4 heads of 20 dims, partial rotary
    factor 0.4 (8 rotated dimensions per head, as 32 of 80 in Phi-2), biases everywhere."""
    from transformers import PhiConfig

    config = PhiConfig(
        vocab_size=512, hidden_size=80, intermediate_size=320, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, partial_rotary_factor=0.4,
        layer_norm_eps=1e-5, initializer_range=0.2,
    )
    return random_model(out, config, dtype, seed)


def random_model(out: str | os.PathLike[str], config: Any, dtype: str = "float32", seed: int = 0) -> Path:
    """A transformers LlamaForCausalLM or PhiForCausalLM of ``config`` (a transformers config)
    with weights drawn from ``torch.manual_seed(seed)``, norms and biases randomized too, saved
    into ``out`` as safetensors of ``dtype``."""
    import torch
    from transformers import LlamaForCausalLM, PhiForCausalLM

    classes = {"llama": LlamaForCausalLM, "phi": PhiForCausalLM}
    if config.model_type not in classes:
        raise ValueError(f"config: model_type {config.model_type!r}; expected 'llama' or 'phi'")
    torch.manual_seed(seed)
    model = classes[config.model_type](config).eval()
    _randomize_norms_and_biases(model, seed)
    return _save(model, Path(out), dtype)


def model_folder(name_or_path: str | os.PathLike[str]) -> Path | None:
    """A model folder (config.json and safetensors weights) given by path or by a name the
    loader knows (tiny-llama, the embedded smollm2-135m, a cached hub id); None when none."""
    from labkit.models.errors import ModelLoadError
    from labkit.models.loader import resolve

    try:
        p = Path(resolve(name_or_path)[1])
    except ModelLoadError:
        return None
    has_weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    return p if (p / "config.json").is_file() and has_weights else None


def shipped_model_dir() -> Path | None:
    """data/models/tiny-llama when it has been trained and committed, else None."""
    return model_folder(paths.repo_models_dir() / "tiny-llama")


_PROMPT_TEXTS = [
    "Once upon a time, a small model",
    "The weather today is",
    "In a quiet village by the sea,",
    "Here is a list of things to do:",
]


def prompt_for(model_dir: str | os.PathLike[str], length: int = 8, seed: int = 0) -> list[int]:
    """A prompt for parity runs: the tokenizer's ids for a fixed sentence (chosen by ``seed``)
    when the folder has a tokenizer.json, else ``length`` seeded random ids in the vocabulary."""
    model_dir = Path(model_dir)
    tok = model_dir / "tokenizer.json"
    if tok.is_file():
        from tokenizers import Tokenizer

        text = _PROMPT_TEXTS[seed % len(_PROMPT_TEXTS)]
        ids = Tokenizer.from_file(str(tok)).encode(text).ids
        if ids:
            return [int(i) for i in ids]
    vocab = read_config(model_dir)["vocab_size"]
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, size=length)]


# A port within LOGIT_TOL of the reference moves each logit by at most LOGIT_TOL, so it cannot
# change a greedy choice whose top-two margin exceeds twice that. A step with a smaller margin is
# decided by rounding, not by the model; fixtures avoid such prompts (see clear_reference).
MIN_MARGIN = 2 * LOGIT_TOL


def clear_reference(
    model_dir: str | os.PathLike[str], steps: int, tries: int = 4
) -> refdump.RefDump:
    """A reference run whose greedy choices all win by at least MIN_MARGIN.

    Why: when two logits tie to within float32 noise, PyTorch and any correct port may pick
    different tokens, and the 100 % greedy-agreement test would fail for no fault of the port.
    The prompt is changed (deterministically, up to ``tries`` prompts) until every step has a
    clear winner; if none does, the clearest run is returned and its meta says so.
    """
    model = load_reference_model(model_dir)
    best: refdump.RefDump | None = None
    for seed in range(tries):
        dump = reference(model_dir, prompt_for(model_dir, seed=seed), steps, model=model)
        if best is None or dump.meta["min_top2_margin"] > best.meta["min_top2_margin"]:
            best = dump
        if dump.meta["min_top2_margin"] >= MIN_MARGIN:
            break
    assert best is not None
    best.meta["clear_margin"] = bool(best.meta["min_top2_margin"] >= MIN_MARGIN)
    return best


@dataclass(frozen=True)
class Case:
    """One fixture: a model folder and the reference dump the port must reproduce."""

    name: str
    model: Path
    dump: Path
    arch: str
    dtype: str


def _tiny_cases() -> list[tuple[str, Any]]:
    return [
        ("llama-gqa-f32", lambda d: tiny_llama(d, "float32", seed=0)),
        ("llama-gqa-f16", lambda d: tiny_llama(d, "float16", seed=0)),
        ("llama-gqa-bf16", lambda d: tiny_llama(d, "bfloat16", seed=0)),
        (
            "llama-tied-bias-f32",
            lambda d: tiny_llama(
                d, "float32", seed=1, tie=True, bias=True, rope_theta=500000.0, legacy_config=True
            ),
        ),
        ("phi-f32", lambda d: tiny_phi(d, "float32", seed=0)),
        ("phi-f16", lambda d: tiny_phi(d, "float16", seed=0)),
    ]


def prepare_fixtures(
    out: str | os.PathLike[str], steps: int = GREEDY_STEPS, include_shipped: bool = True
) -> list[Case]:
    """Write the folder ``swift test`` reads (through ``LMPORT_FIXTURES``) and return its cases.

    Layout: ``<out>/<case>/model/`` (an HF folder), ``<out>/<case>/reference.lmref`` (a
    :mod:`labkit.ports.refdump` file of ``steps`` greedy steps), ``<out>/dtypes.safetensors`` (the
    same values stored as F32, F16 and BF16 with their exact float32 expansions, for the
    reader's unit test) and ``<out>/manifest.json`` listing the cases. The shipped tiny-llama,
    when present, is referenced in place (not copied).
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for name, make in _tiny_cases():
        model_dir = make(out / name / "model")
        cases.append(Case(name, model_dir, out / name / "reference.lmref", "", ""))
    shipped = shipped_model_dir() if include_shipped else None
    if shipped is not None:
        cases.append(Case("tiny-llama", shipped, out / "tiny-llama" / "reference.lmref", "", ""))

    written: list[Case] = []
    for case in cases:
        dump = clear_reference(case.model, steps)
        refdump.write(case.dump, dump)
        written.append(Case(case.name, case.model, case.dump, dump.meta["arch"], dump.meta["dtype"]))

    tokenizer_cases(out / "tokenizers")

    # The dtype-conversion fixture: awkward values (signed zero, subnormal and largest halves,
    # infinities, values that round) stored three ways, each with its exact float32 expansion.
    values = torch.tensor(
        [0.0, -0.0, 1.0, -2.5, 65504.0, 6.1e-5, 5.96e-8, -3.0e-7, 1 / 3, 3.14159, 1e-3, 1e4,
         float("inf"), float("-inf"), 123.456, -0.1],
        dtype=torch.float32,
    )
    tensors = {"f32": values, "f16": values.half(), "bf16": values.bfloat16()}
    tensors["f16_expected"] = values.half().float()
    tensors["bf16_expected"] = values.bfloat16().float()
    with files.atomic_path(out / "dtypes.safetensors") as tmp:
        save_file(tensors, str(tmp))

    manifest = {
        "version": FIXTURES_VERSION,
        "dtypes": "dtypes.safetensors",
        "tokenizers": "tokenizers/cases.json",
        "cases": [
            {
                "name": c.name,
                "model": str(c.model.resolve()),
                "dump": str(c.dump.resolve()),
                "arch": c.arch,
                "dtype": c.dtype,
            }
            for c in written
        ],
    }
    files.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return written


# Training text for the fixture tokenizer, and texts it has not seen (unicode, digits, runs of
# whitespace, contractions, an added token in the middle) for the Swift tokenizer's test.
_TOKENIZER_TRAIN = [
    "Once upon a time, a small model learned to count: one, two, three, 4, 5, 66, 777.",
    "The cache holds keys and values; it's preallocated so decoding never allocates.",
    "def forward(self, x):\n    return self.norm(x) + 1  # residual",
    "Grouped-query attention shares key/value heads between several query heads.",
    "Ein kleines Modell läuft auf dem Gerät. Le modèle tourne sur l'appareil.",
]
_TOKENIZER_TEXTS = [
    "Once upon a time",
    "It's the model's cache, isn't it? We'll see; they'd know.",
    "  leading spaces,\ttabs\tand\n\nnewlines  \n",
    "numbers 1234567 and 3.14159, and 2026-11-28",
    "unicode: naïve café, Ærøskøbing, 東京, Привет, emoji 🙂👍🏽",
    "an added token <|eos|> in the middle<|bos|>",
    "code: x[i] = (a + b) * c; // done",
    "",
]


def tokenizer_cases(out: str | os.PathLike[str]) -> Path:
    """Token ids from the `tokenizers` library for the Swift BPE tokenizer's test.

    Writes a small byte-level BPE trained here (GPT-2 pre-tokenizer, a <|bos|> template) and
    ``cases.json`` with, per tokenizer.json, the texts and the ids `tokenizers` gives them. The
    shipped tiny-llama's tokenizer is included when it exists.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_TRAIN, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))]
    )
    tokenizers = [out / "fixture-tokenizer.json"]
    with files.atomic_path(tokenizers[0]) as tmp:
        tok.save(str(tmp))
    shipped = shipped_model_dir()
    if shipped is not None and (shipped / "tokenizer.json").is_file():
        tokenizers.append(shipped / "tokenizer.json")
    texts = _TOKENIZER_TEXTS + _TOKENIZER_TRAIN
    cases = []
    for f in tokenizers:
        t = Tokenizer.from_file(str(f))
        cases.append(
            {"tokenizer": str(f.resolve()), "texts": texts, "ids": [t.encode(x).ids for x in texts]}
        )
    return files.atomic_write_text(
        out / "cases.json", json.dumps({"cases": cases}, ensure_ascii=False, indent=1)
    )


def compare_logits(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Max absolute and relative (to the reference's max |logit| per step) logit error."""
    if ours.shape != ref.shape:
        raise ValueError(f"logits shapes differ: ours {ours.shape}, reference {ref.shape}")
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    scale = np.maximum(np.abs(ref).max(axis=1, keepdims=True), 1e-12)
    return {"max_abs": float(diff.max()), "max_rel": float((diff / scale).max())}


def reads_as_stored(model_dir: str | os.PathLike[str]) -> bool:
    """Whether the CLI reads ``model_dir``'s weights as they are: one model.safetensors whose
    tensors are all F32, F16 or BF16 (Safetensors.swift widens each to float32 on load)."""
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file() or (Path(model_dir) / "model.safetensors.index.json").exists():
        return False
    header = read_safetensors_header(path)
    return all(info["dtype"] in ("F32", "F16", "BF16") for name, info in header.items()
               if name != "__metadata__")


def convert_weights(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str
) -> Path:
    """Copy the model folder ``src`` to ``dst`` with every weight stored as ``dtype``
    (float32, float16, bfloat16) in one model.safetensors; other files (config.json, tokenizer)
    are copied as they are. For comparing one model stored at two precisions. ``dst`` is
    replaced as a whole (one atomic folder swap)."""
    import torch
    from safetensors.torch import load_file, save_file

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype: expected one of {sorted(dtypes)}, got {dtype!r}")
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: expected a model folder with config.json")
    tensors: dict[str, Any] = {}
    for f in weight_files(src):
        tensors.update({k: v.to(dtypes[dtype]).contiguous() for k, v in load_file(str(f)).items()})
    with files.atomic_dir(dst) as tmp:
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return dst
