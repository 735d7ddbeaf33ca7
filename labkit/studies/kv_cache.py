"""Study 01, the KV cache: what it holds, what it saves, what it costs, how close decode gets to
the memory-bandwidth limit.

The notebook ``notebooks/01_kv_cache.ipynb`` and ``labkit bench kv-cache`` both call this module,
so the numbers they record are computed one way. What lives here, one idea per section:

* Bytes. ``cache_shapes`` (what one layer stores) and ``tensor_bytes`` (bytes of the real
  tensors of any cache); the formula itself is ``labkit.inference.kv_cache.kv_cache_bytes`` (the one
  source of truth), applied to published configs read from ``data/configs/`` (no weights) and to
  MHA / GQA / MQA variants of one shape.
* Cache variants, each following the cache protocol of ``labkit.inference.kv_cache`` so the models
  run with them unchanged: ``ConcatKVCache`` grows by ``torch.cat`` (what a first implementation
  does, and what a Core ML stateful model cannot do: its state has a fixed shape, notebook 02),
  and ``SlidingWindowKVCache``, a ring buffer of the last ``window`` positions.
* A fast decode loop, ``FastDecoder``: the levers that cut the per-token overhead of a Python
  decoder (fused projections, no ``nn.Module`` dispatch, one preallocated cache, inference mode).
* The roofline: ``decode_bytes_per_token`` (weights + KV read for one token) and
  ``roofline_fraction`` (time at the copy bandwidth / measured time).
* Measurements (``time_cached``, ``time_uncached``, ``tokens_per_s_*``) and ``bench``.

Nothing imports this module at ``import labkit`` time (the bench registry resolves it lazily), so
torch is imported at the top; transformers and pandas only inside the functions that need them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from labkit.core import paths
from labkit.inference.fast_decode import FastDecoder
from labkit.inference.kv_cache import KVCache
from labkit.models.llama import Llama
from labkit.models.sizes import decode_bytes_per_token, head_dim_of, kv_cache_bytes_for_config

if TYPE_CHECKING:
    import pandas as pd

STUDY = "01_kv_cache"

#: Published configs the study sizes caches for, by file stem under data/configs/ (shapes only).
PUBLISHED = {
    "Llama 2 7B": "meta-llama__Llama-2-7b-hf",
    "Phi-2": "microsoft__phi-2",
    "xLAM-1b": "Salesforce__xLAM-1b-fc-r",
    "Llama 3.1 8B": "meta-llama__Llama-3.1-8B",
}

#: Apple's figure for Llama 3.1 8B in fp16 at 8,192 tokens ("about 1 GB"), from "On Device
#: Llama 3.1 with Core ML" (machinelearning.apple.com/research/core-ml-on-device-llama).
APPLE_LLAMA31_8B_CACHE_GB = 1.0
APPLE_CONTEXT = 8192

# --------------------------------------------------------------------------- what is cached


def cache_shapes(cfg: Any, positions: int, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Shapes one layer of the cache holds after ``positions`` tokens: K and V, each
    ``[batch, kv_heads, positions, head_dim]`` (the layout of ``KVCache`` and transformers')."""
    kv_heads = _get(cfg, "num_key_value_heads") or _get(cfg, "num_attention_heads")
    shape = (batch, int(kv_heads), positions, int(head_dim_of(cfg)))
    return {"k": shape, "v": shape}


def tensor_bytes(cache: Any) -> int:
    """Bytes of the K and V tensors a cache object really holds (allocated, not just filled).

    Works for ``KVCache``, ``ConcatKVCache``, ``SlidingWindowKVCache`` (lists ``.k``/``.v``) and
    transformers' ``DynamicCache`` (``.layers[i].keys/.values``). Used to check the formula.
    """
    tensors: list[Any] = []
    if hasattr(cache, "k") and hasattr(cache, "v"):
        tensors = [t for t in list(cache.k) + list(cache.v) if t is not None]
    elif hasattr(cache, "layers"):
        for layer in cache.layers:
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                        if t is not None]
    else:
        raise TypeError(f"tensor_bytes: don't know where {type(cache).__name__} keeps K and V")
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


# --------------------------------------------------------------------------- published configs


def configs_dir() -> Path:
    """data/configs/ in the checkout: config.json files of models we size but never load."""
    return paths.configs_dir()


def published_config(stem: str) -> dict[str, Any]:
    """The config dict stored as ``data/configs/<stem>.json`` (keys starting with ``_`` dropped,
    ``num_key_value_heads: null`` read as plain multi-head attention)."""
    path = configs_dir() / f"{stem}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in configs_dir().glob("*.json")))
        raise FileNotFoundError(f"{path}: no such config; known: {known}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"{path}: expected an integer {key!r}, got {cfg.get(key)!r}")
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


def attention_variants(cfg: Mapping[str, Any], gqa_group: int = 4) -> dict[str, dict[str, Any]]:
    """The same shape with MHA (one KV head per query head), GQA (``gqa_group`` query heads per
    KV head) and MQA (one KV head for all): only ``num_key_value_heads`` changes."""
    heads = int(cfg["num_attention_heads"])
    if heads % gqa_group:
        raise ValueError(f"gqa_group={gqa_group} must divide num_attention_heads={heads}")
    return {
        "MHA": {**cfg, "num_key_value_heads": heads, "head_dim": head_dim_of(cfg)},
        "GQA": {**cfg, "num_key_value_heads": heads // gqa_group, "head_dim": head_dim_of(cfg)},
        "MQA": {**cfg, "num_key_value_heads": 1, "head_dim": head_dim_of(cfg)},
    }


def attention_kind(cfg: Any) -> str:
    """'MHA', 'MQA' or 'GQA h:kv' for a config."""
    heads = int(_get(cfg, "num_attention_heads"))
    kv = int(_get(cfg, "num_key_value_heads") or heads)
    if kv == heads:
        return "MHA"
    return "MQA" if kv == 1 else f"GQA {heads}:{kv}"


def cache_bytes_table(
    configs: Mapping[str, Any], contexts: Iterable[int], dtype_bytes: float = 2, batch: int = 1
) -> pd.DataFrame:
    """Rows (model, attention, context, dtype_bytes, bytes) from the one formula, per config."""
    import pandas as pd

    rows = []
    for name, cfg in configs.items():
        for context in contexts:
            rows.append({
                "model": name,
                "attention": attention_kind(cfg),
                "context": int(context),
                "dtype_bytes": dtype_bytes,
                "bytes": kv_cache_bytes_for_config(cfg, int(context), dtype_bytes, batch),
            })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- roofline


def roofline_seconds(bytes_per_token: float, bandwidth_gbs: float) -> float:
    """The fastest a memory-bound step can be: bytes / bandwidth."""
    if not bandwidth_gbs > 0:
        raise ValueError(f"bandwidth_gbs must be > 0, got {bandwidth_gbs!r}")
    if not bytes_per_token >= 0:
        raise ValueError(f"bytes_per_token must be >= 0, got {bytes_per_token!r}")
    return bytes_per_token / (bandwidth_gbs * 1e9)


def roofline_fraction(bytes_per_token: float, seconds_per_token: float, bandwidth_gbs: float) -> float:
    """Achieved bandwidth / available bandwidth = roofline time / measured time (1.0 = at the
    limit). Bandwidth is the copy bandwidth of ``labkit.core.env`` (read + write counted), so a step
    that only reads could in principle exceed 1."""
    if not seconds_per_token > 0:
        raise ValueError(f"seconds_per_token must be > 0, got {seconds_per_token!r}")
    return roofline_seconds(bytes_per_token, bandwidth_gbs) / seconds_per_token


def roofline_config(size: str = "full") -> dict[str, Any]:
    """A Llama config whose fp32 weights dwarf any CPU cache: ~168 M parameters ("full", 670 MB)
    or ~60 M ("quick", 240 MB, still several times a 32 MiB L3)."""
    if size == "full":
        shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                     num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    elif size == "quick":
        shape = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                     num_attention_heads=12, num_key_value_heads=4, vocab_size=16000)
    else:
        raise ValueError(f"size must be 'full' or 'quick', got {size!r}")
    return {**shape, "max_position_embeddings": 2048, "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5}


def random_llama(cfg_dict: Mapping[str, Any], seed: int = 0):
    """labkit's Llama with random weights for ``cfg_dict`` (eval mode, fp32, CPU)."""
    from labkit.models.config import LlamaConfig

    torch.manual_seed(seed)
    return Llama(LlamaConfig(**cfg_dict)).eval()


def hf_twin(model: Any):
    """transformers' LlamaForCausalLM with exactly ``model``'s weights (for generate())."""
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in model.config.to_hf_dict().items()
                                      if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # Non-persistent buffers (RoPE inverse frequencies) were built on 'meta': build them again.
    rotary = type(hf.model.rotary_emb)
    with torch.device("cpu"):
        hf.model.rotary_emb = rotary(cfg)
    return hf.eval()


# --------------------------------------------------------------------------- measurements


def make_prompt(vocab_size: int, length: int, batch: int = 1, seed: int = 0):
    """Random token ids ``[batch, length]`` (deterministic for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def time_cached(model: Any, prompt: torch.Tensor, gen_len: int, *, decoder: FastDecoder | None
                = None, cache: Any | None = None, sync: Callable[[], None] | None = None):
    """TTFT and per-step latencies of a cached greedy generation of ``gen_len`` tokens.

    Prefill = the readable model over the prompt into ``cache`` (default: a preallocated
    KVCache); each decode step = ``decoder.step`` if a FastDecoder is given, else the readable
    model on one token. Returns ``(labkit.core.timing.GenerationTiming, new tokens [B, gen_len])``.
    """
    from labkit.core.timing import time_generation

    t = prompt.shape[1]
    kv = cache if cache is not None else KVCache.for_model(
        model, max_len=t + gen_len, batch=prompt.shape[0])
    if decoder is not None and not isinstance(kv, KVCache):
        raise ValueError("time_cached: FastDecoder writes into a KVCache; pass no cache")
    kv.reset()

    def prefill():
        return model(prompt, cache=kv)[:, -1].argmax(-1)

    def step(token):
        if decoder is not None:
            return decoder.step(token, kv).argmax(-1)
        return model(token[:, None], cache=kv)[:, -1].argmax(-1)

    with torch.inference_mode():
        timing, tokens = time_generation(prefill, step, gen_len, sync=sync)
    return timing, torch.stack(tokens, dim=1)


def time_uncached(model: Any, prompt: torch.Tensor, gen_len: int,
                  sync: Callable[[], None] | None = None):
    """The same generation without a cache: every step reruns the model on the whole sequence.
    Returns ``(GenerationTiming, new tokens [B, gen_len])``."""
    from labkit.core.timing import time_generation

    b, t = prompt.shape
    seq = torch.empty(b, t + gen_len, dtype=torch.long, device=prompt.device)
    seq[:, :t] = prompt
    state = {"n": t}

    def run():
        token = model(seq[:, : state["n"]])[:, -1].argmax(-1)
        seq[:, state["n"]] = token
        state["n"] += 1
        return token

    with torch.inference_mode():
        timing, tokens = time_generation(run, lambda _tok: run(), gen_len, sync=sync)
    return timing, torch.stack(tokens, dim=1)


def tokens_per_s_hf_generate(hf_model: Any, prompt: torch.Tensor, gen_len: int,
                             sync: Callable[[], None] | None = None) -> tuple[float, Any]:
    """Wall-clock tokens/s of ``transformers`` ``generate`` (greedy, its default DynamicCache),
    prefill included, and the tokens it produced. ``sync`` waits for a GPU before each clock read."""
    import time

    wait = sync or (lambda: None)
    with torch.inference_mode():
        wait()
        start = time.perf_counter()
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
        wait()
        seconds = time.perf_counter() - start
    return gen_len / seconds, out


def tokens_per_s_ours(run: Callable[[], Any], gen_len: int,
                      sync: Callable[[], None] | None = None) -> tuple[float, Any]:
    """Wall-clock tokens/s of ``run()`` (a whole greedy generation, prefill included)."""
    import time

    wait = sync or (lambda: None)
    wait()
    start = time.perf_counter()
    out = run()
    wait()
    return gen_len / (time.perf_counter() - start), out


def cache_update_seconds(kind: str, lengths: Iterable[int], *, num_kv_heads: int, head_dim: int,
                         repeats: int = 20) -> list[float]:
    """Median seconds of one cache update (one layer, one token) at each cache length, for
    'concat' (torch.cat into a new tensor) or 'inplace' (write into a preallocated buffer)."""
    from labkit.core.timing import measure

    out = []
    for n in lengths:
        k_old = torch.randn(1, num_kv_heads, n, head_dim)
        new = torch.randn(1, num_kv_heads, 1, head_dim)
        if kind == "concat":
            def fn(k_old=k_old, new=new):
                return torch.cat((k_old, new), dim=2)
        elif kind == "inplace":
            buf = torch.empty(1, num_kv_heads, n + 1, head_dim)

            def fn(buf=buf, new=new, n=n):
                buf[:, :, n : n + 1] = new
                return buf[:, :, : n + 1]
        else:
            raise ValueError(f"kind must be 'concat' or 'inplace', got {kind!r}")
        out.append(measure(fn, warmup=2, repeats=repeats).median)
    return out


def pick_threads(model: Any, candidates: Iterable[int], tokens: int = 6) -> tuple[int, dict]:
    """Set torch's CPU thread count to the fastest of ``candidates`` for a short FastDecoder run
    of ``model``, and return ``(threads, {threads: tokens/s})``.

    Why measure instead of taking the core count: on a shared or busy machine, OpenMP threads
    that wait for a descheduled sibling at every barrier make 2 threads several times slower
    than 1; on an idle machine the opposite holds. The answer is the machine's, at that moment.
    """
    decoder = FastDecoder(model)
    prompt = make_prompt(model.config.vocab_size, 8, seed=3).to(next(model.parameters()).device)
    speeds = {}
    for n in candidates:
        torch.set_num_threads(int(n))
        decoder.greedy(prompt, 2)  # warm-up
        speeds[int(n)] = tokens_per_s_ours(lambda: decoder.greedy(prompt, tokens), tokens)[0]
    best = max(speeds, key=speeds.get)
    torch.set_num_threads(best)
    return best, speeds


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): recorded beside CPU timings,
    because other processes on the same cores slow every number here."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------- bench


def bench(quick: bool = False, model_name: str = "tiny-llama") -> list[dict]:
    """`labkit bench kv-cache`: the notebook's headline numbers, recorded under study 01_kv_cache.

    cache_bytes for the published configs; ttft/tpot and cache_speedup on ``model_name``;
    speedup_vs_hf_generate on it; decode_roofline_fraction on a random ~168 M (quick: ~60 M)
    parameter Llama against the measured DRAM copy bandwidth. CPU only.
    """
    from labkit.core import env, results
    from labkit.models import load

    recs: list[dict] = []
    # memory from configs alone
    for name, stem in PUBLISHED.items():
        cfg = published_config(stem)
        for context in (1024, 4096, 8192):
            recs.append(results.record(
                STUDY, "cache_bytes", kv_cache_bytes_for_config(cfg, context, 2), "bytes",
                runtime="formula", device="none", model=name,
                params={"model": name, "context": context, "attention": attention_kind(cfg),
                        "dtype_bytes": 2}))
    loaded = load(model_name, device="cpu")
    model = loaded.model
    threads, _ = pick_threads(model, (1, 2))
    decoder = FastDecoder(model)
    gen_len = 32 if quick else 128
    for prompt_len in (16, 64) if quick else (16, 64, 256):
        prompt = make_prompt(model.config.vocab_size, prompt_len)
        cached, _ = time_cached(model, prompt, gen_len)
        uncached, _ = time_uncached(model, prompt, gen_len)
        for cache_on, timing in (("on", cached), ("off", uncached)):
            p = {"prompt_len": prompt_len, "gen_len": gen_len, "cache": cache_on,
                 "threads": threads, "load_avg_1m": load_average()}
            recs.append(results.record(STUDY, "ttft_ms", timing.ttft_s * 1e3, "ms",
                                       model=model_name, params=p))
            recs.append(results.record(STUDY, "tpot_ms", timing.tpot_median_s * 1e3, "ms",
                                       model=model_name, params=p))
        recs.append(results.record(
            STUDY, "cache_speedup", uncached.total_s / cached.total_s, "1", model=model_name,
            params={"prompt_len": prompt_len, "gen_len": gen_len, "threads": threads}))
    # ours vs transformers.generate, same weights, same prompt, same thread count
    hf = load(model_name, device="cpu", impl="hf").model
    prompt = make_prompt(model.config.vocab_size, 32)
    ours, theirs = [], []
    for _ in range(2 if quick else 3):
        ours.append(tokens_per_s_ours(lambda: decoder.greedy(prompt, 128), 128)[0])
        theirs.append(tokens_per_s_hf_generate(hf, prompt, 128)[0])
    ratio = float(sorted(ours)[len(ours) // 2] / sorted(theirs)[len(theirs) // 2])
    recs.append(results.record(
        STUDY, "speedup_vs_hf_generate", ratio, "1", model=model_name,
        params={"loop": "FastDecoder", "prompt_len": 32, "gen_len": 128, "threads": threads,
                "load_avg_1m": load_average()}))
    del hf
    # roofline
    cfg = roofline_config("quick" if quick else "full")
    big = random_llama(cfg)
    big_decoder = FastDecoder(big)
    bw = env.peak_copy_bandwidth_gbs(env.copy_bandwidth([2**26, 2**27, 2**28], repeats=3))
    prompt = make_prompt(cfg["vocab_size"], 16)
    timing, _ = time_cached(big, prompt, 16 if quick else 32, decoder=big_decoder)
    position = 16 + (16 if quick else 32) // 2
    bytes_tok = decode_bytes_per_token(cfg, position, 4)["total"]
    recs.append(results.record(
        STUDY, "decode_roofline_fraction",
        roofline_fraction(bytes_tok, timing.tpot_median_s, bw), "1", model="random-llama",
        params={"loop": "FastDecoder", "params": big.num_parameters(),
                "bytes_per_token": bytes_tok, "copy_bandwidth_gbs": bw, "threads": threads,
                "load_avg_1m": load_average()}))
    return recs
