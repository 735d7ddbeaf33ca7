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
  ``roofline_fraction`` (time at the copy bandwidth / measured time; from
  ``labkit.core.bandwidth``, with its ``margin`` check).
* Measurements (``time_cached``, ``time_uncached``, ``tokens_per_s_*``) and ``bench``.

Nothing imports this module at ``import labkit`` time (the bench registry resolves it lazily), so
torch is imported at the top; transformers and pandas only inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from labkit.core import paths, tolerances
from labkit.core.bandwidth import roofline_fraction, roofline_seconds
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

# roofline_seconds and roofline_fraction come from labkit.core.bandwidth (imported above).


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


# --------------------------------------------------------------------------- the notebook's steps


@dataclass
class Setup:
    """The model under study and how it is timed (what every later step of the notebook reads)."""

    name: str
    model: Any
    card: dict
    device: str
    sync: Callable[[], None]
    threads: int
    thread_speeds: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # what ``record`` wrote, in order

    @property
    def cfg(self) -> Any:
        return self.model.config

    def describe(self) -> str:
        cfg, card = self.cfg, self.card
        text = (f"{card['name']}: {card['num_parameters'] / 1e6:.1f} M parameters, {card['dtype']}, "
                f"on {self.device}; {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} "
                f"query heads, {cfg.num_key_value_heads} KV heads of {cfg.head_dim}")
        if self.thread_speeds:
            speeds = {k: round(v, 1) for k, v in self.thread_speeds.items()}
            text += (f"\ntokens/s by thread count: {speeds} -> using {self.threads} (1-minute "
                     f"load average {load_average()} on {os.cpu_count()} cores)")
        else:
            text += f"\n{self.device}: timings on the GPU; CPU threads left at {self.threads}"
        return text

    def record(self, metric: str, value: float, unit: str, *, params: dict,
               model: str | None = None, device: str | None = None,
               runtime: str = "torch") -> dict:
        """One value of this study; timings carry the load average they were taken under."""
        from labkit.core import results

        if runtime != "formula":
            params = {**params, "load_avg_1m": load_average()}
        rec = results.record(STUDY, metric, float(value), unit, runtime=runtime,
                             device=device or self.device, model=model or self.name, params=params)
        self.records.append(rec)
        return rec


def setup(model_name: str, device: str, thread_candidates: Iterable[int]) -> Setup:
    """Load ``model_name`` on ``device`` and, on a CPU, pick the fastest thread count *now*.

    On a CPU the thread count matters as much as anything, and a busy machine's answer differs
    from an idle one's: the fastest of ``thread_candidates`` for this machine at this moment is
    kept for every CPU timing, for every contestant alike.
    """
    from labkit.core import env
    from labkit.core.skips import skip
    from labkit.core.timing import device_sync
    from labkit.models import load

    torch.manual_seed(0)
    dev = env.pick_device(device)
    if dev != "mps":
        skip("MPS timings", env.optional_runtimes()["mps"] or f"DEVICE={device!r} resolved to {dev!r}")
    loaded = load(model_name, device=dev)
    out = Setup(model_name, loaded.model, loaded.card, dev, device_sync(dev), torch.get_num_threads())
    if dev == "cpu":
        out.threads, out.thread_speeds = pick_threads(loaded.model, thread_candidates)
    return out


def cache_bytes_check(model: Any, positions: int = 20) -> dict[str, Any]:
    """Fill a KVCache with ``positions`` tokens: its tensors' shape and bytes against the formula."""
    device = next(model.parameters()).device
    kv = KVCache.for_model(model, max_len=positions)
    with torch.inference_mode():
        model(make_prompt(model.config.vocab_size, positions, seed=1).to(device), cache=kv)
    size = kv.k[0].element_size()
    return {"kv": kv, "shape": tuple(kv.k[0].shape), "expected_shape": cache_shapes(model.config, positions)["k"],
            "formula": kv_cache_bytes_for_config(model.config, positions, size),
            "real": tensor_bytes(kv), "per_token": kv_cache_bytes_for_config(model.config, 1, size),
            "dtype_bytes": size}


def cache_changes_nothing(model: Any, gen_len: int, prompt_len: int = 8) -> dict[str, Any]:
    """Greedy tokens and logits with the cache and without it (every step reruns the sequence).

    ``tokens_agree``: identical, or first different at a near-tie on a GPU
    (:func:`~labkit.inference.generate.agreed_steps`); the logit gap covers the shared steps."""
    from labkit.inference.generate import agreed_steps, greedy

    device = next(model.parameters()).device
    prompt = make_prompt(model.config.vocab_size, prompt_len, seed=2).to(device)
    with_cache = greedy(model, prompt, gen_len, cache=True, return_logits=True)
    without = greedy(model, prompt, gen_len, cache=False, return_logits=True)
    shared, agree = agreed_steps(with_cache.new_tokens, without.new_tokens, without.logits,
                                 tolerances.NEAR_TIE.at(device.type))
    last = min(shared + 1, gen_len)  # logits of a step compare only while both saw one prefix
    return {"prompt": prompt, "with_cache": with_cache,
            "tokens_identical": bool(torch.equal(with_cache.tokens, without.tokens)),
            "tokens_agree": agree, "steps_identical": shared,
            "logit_gap": (with_cache.logits[:, :last] - without.logits[:, :last]).abs().max().item()}


def versus_dynamic_cache(model: Any, hf: Any, tokens: torch.Tensor, prefix: int = 8,
                         steps: int = 16) -> dict[str, Any]:
    """Ours against transformers' DynamicCache on the same weights: prefill ``prefix`` tokens,
    then ``steps`` decode steps; the largest logit difference and the bytes each cache holds."""
    import transformers

    ids = tokens[:, : prefix + steps]
    ours, theirs = KVCache.for_model(model, max_len=prefix + steps), transformers.DynamicCache(config=hf.config)
    with torch.inference_mode():
        gaps = [(model(ids[:, :prefix], cache=ours)
                 - hf(ids[:, :prefix], cache=theirs, use_cache=True).logits).abs().max().item()]
        for pos in range(prefix, ids.shape[1]):
            a = model(ids[:, pos : pos + 1], cache=ours)
            b = hf(ids[:, pos : pos + 1], cache=theirs, use_cache=True).logits
            gaps.append((a - b).abs().max().item())
    return {"gap": max(gaps), "steps": len(gaps) - 1, "hf_bytes": tensor_bytes(theirs),
            "formula_bytes": kv_cache_bytes_for_config(model.config, ids.shape[1], 4)}


def latency_sweep(s: Setup, prompt_lens: Iterable[int], gen_len: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """TTFT and TPOT with and without the cache per prompt length, recorded; the tokens must agree.

    Returns (one row per prompt length and cache setting, one row per generated position).
    """
    import pandas as pd

    rows, per_step = [], []
    for prompt_len in prompt_lens:
        prompt = make_prompt(s.cfg.vocab_size, prompt_len, seed=prompt_len).to(s.device)
        time_cached(s.model, prompt, 2, sync=s.sync)  # warm-up at this shape
        on, on_tokens = time_cached(s.model, prompt, gen_len, sync=s.sync)
        off, off_tokens = time_uncached(s.model, prompt, gen_len, sync=s.sync)
        if not torch.equal(on_tokens, off_tokens):
            raise AssertionError(f"prompt_len={prompt_len}: cached and uncached tokens differ")
        for cache, timing in (("on", on), ("off", off)):
            params = {"prompt_len": prompt_len, "gen_len": gen_len, "cache": cache, "threads": s.threads}
            s.record("ttft_ms", timing.ttft_s * 1e3, "ms", params=params)
            s.record("tpot_ms", timing.tpot_median_s * 1e3, "ms", params=params)
            rows.append({"prompt_len": prompt_len, "cache": cache, "ttft_ms": timing.ttft_s * 1e3,
                         "tpot_ms": timing.tpot_median_s * 1e3, "total_s": timing.total_s})
            for i, sec in enumerate([timing.ttft_s, *timing.tpot_s]):
                per_step.append({"prompt_len": prompt_len, "cache": cache,
                                 "position": prompt_len + i, "ms": sec * 1e3})
        s.record("cache_speedup", off.total_s / on.total_s, "1",
                 params={"prompt_len": prompt_len, "gen_len": gen_len, "threads": s.threads})
    return pd.DataFrame(rows), pd.DataFrame(per_step)


def latency_summary(timings: pd.DataFrame) -> pd.DataFrame:
    """TTFT, TPOT and total time per prompt length, cache on and off, and the cache's speed-up."""
    summary = timings.pivot(index="prompt_len", columns="cache", values=["ttft_ms", "tpot_ms", "total_s"])
    summary[("cache_speedup", "")] = summary[("total_s", "off")] / summary[("total_s", "on")]
    return summary


def memory_table(model_cfg: Any, model_name: str, contexts: Iterable[int],
                 dtype_bytes: float) -> tuple[pd.DataFrame, dict, dict]:
    """Cache bytes against context: the published configs (fp16), the MHA/GQA/MQA variants of
    Llama 2 7B's shape, and the model under study at its dtype. Returns (table, published, variants)."""
    import pandas as pd

    contexts = list(contexts)
    published = {name: published_config(stem) for name, stem in PUBLISHED.items()}
    variants = attention_variants(published["Llama 2 7B"], gqa_group=4)
    table = pd.concat([
        cache_bytes_table(published, contexts, dtype_bytes=2),
        cache_bytes_table({f"Llama 2 7B shape, {k}": v for k, v in variants.items()}, contexts, 2),
        cache_bytes_table({model_name: model_cfg}, contexts, dtype_bytes=dtype_bytes),
    ], ignore_index=True)
    return table, published, variants


def record_memory_table(s: Setup, table: pd.DataFrame) -> None:
    for row in table.itertuples():
        s.record("cache_bytes", row.bytes, "bytes", runtime="formula", device="none", model=row.model,
                 params={"model": row.model, "context": row.context, "attention": row.attention,
                         "dtype_bytes": row.dtype_bytes})


def cache_variants(s: Setup, update_lengths: list[int], window: int, prompt_len: int,
                   equality: dict[str, Any], gen_len: int) -> dict[str, Any]:
    """Concatenation against in place (one update; a whole decode, same tokens) and a sliding
    window (agreement with the full cache, and its fixed memory)."""
    import pandas as pd

    from labkit.inference.generate import greedy
    from labkit.inference.kv_cache import ConcatKVCache, SlidingWindowKVCache

    shape = {"num_kv_heads": s.cfg.num_key_value_heads, "head_dim": s.cfg.head_dim}
    update = pd.DataFrame({
        "length": update_lengths,
        "concat_us": np.array(cache_update_seconds("concat", update_lengths, **shape)) * 1e6,
        "inplace_us": np.array(cache_update_seconds("inplace", update_lengths, **shape)) * 1e6,
    })
    prompt = make_prompt(s.cfg.vocab_size, prompt_len, seed=5).to(s.device)
    e2e = {name: time_cached(s.model, prompt, gen_len, cache=make(), sync=s.sync)
           for name, make in (("in place", lambda: None),
                              ("concat", lambda: ConcatKVCache.for_model(s.model)))}
    ring = SlidingWindowKVCache.for_model(s.model, window=window)
    slid = greedy(s.model, equality["prompt"], gen_len, cache=ring)
    n = equality["prompt"].shape[1] + gen_len
    return {
        "update": update, "e2e": e2e, "window_cache": ring,
        "same_tokens": bool(torch.equal(e2e["in place"][1], e2e["concat"][1])),
        "window_agreement": (slid.new_tokens == equality["with_cache"].new_tokens).float().mean().item(),
        "full_bytes": [kv_cache_bytes_for_config(s.cfg, p, 4) for p in range(1, n + 1)],
        "window_bytes": [kv_cache_bytes_for_config(s.cfg, min(p, window), 4) for p in range(1, n + 1)],
    }


def _timed_loops(big: Any, prompt: torch.Tensor, gen_len: int, repeats: int) -> list[dict]:
    """Best TPOT of each decode loop on ``big`` (prefill excluded; transformers: included)."""
    loops = {"generate.greedy": None, "FastDecoder (unfused)": FastDecoder(big, fuse=False),
             "FastDecoder": FastDecoder(big)}
    rows = []
    for name, dec in loops.items():
        time_cached(big, prompt, 3, decoder=dec)  # warm-up
        tpots = [time_cached(big, prompt, gen_len, decoder=dec)[0].tpot_median_s for _ in range(repeats)]
        rows.append({"loop": name, "tpot_s": min(tpots)})
    twin = hf_twin(big)
    tokens_per_s_hf_generate(twin, prompt, 3)  # warm-up
    runs = [tokens_per_s_hf_generate(twin, prompt, gen_len)[0] for _ in range(repeats)]
    rows.append({"loop": "transformers.generate", "tpot_s": 1 / max(runs)})  # prefill included
    return rows


def roofline_model(s: Setup, size: str) -> tuple[Any, Any, str]:
    """(model, its config, its name) for the roofline: the model under study itself when its
    float32 weights are over 8x the last-level cache (then decode reads DRAM: SmolLM2's 540 MB),
    else a random Llama of ``size`` whose weights are (tiny-llama's 107 MB would partly stay in
    the caches and measure them, not the memory)."""
    from labkit.core import env
    from labkit.models.sizes import weight_bytes_per_token

    llc = max(env.cpu_cache_sizes().values(), default=32 * 2**20)
    if s.device == "cpu" and weight_bytes_per_token(s.cfg, 4) > 8 * llc:
        return s.model.float(), s.cfg, s.name
    rcfg = roofline_config(size)
    return random_llama(rcfg), rcfg, f"random-llama-{size}"


def roofline(s: Setup, size: str, gen_len: int, quick: bool) -> dict[str, Any]:
    """Decode of a model whose fp32 weights dwarf the CPU caches (``roofline_model``), against
    the bytes a step reads over this machine's read bandwidth at the same thread count (the
    stored probe of ``core.bandwidth``); each loop's fraction of that limit, recorded. A fraction
    above 1 + the noise margin raises InstrumentFailed: the limit, not the decoder, is wrong."""
    import pandas as pd

    from labkit.core import env
    from labkit.core.bandwidth import NOISE_MARGIN, read_bandwidth_gbs
    from labkit.models.sizes import weight_bytes_per_token

    bandwidth = read_bandwidth_gbs(s.threads)
    big, cfg, name = roofline_model(s, size)
    prompt = make_prompt(int(_get(cfg, "vocab_size")), 16, seed=6)
    roof = pd.DataFrame(_timed_loops(big, prompt, gen_len, 1 if quick else 2))
    bytes_tok = decode_bytes_per_token(cfg, 16 + gen_len // 2, 4)["total"]
    roof["tokens_per_s"] = 1 / roof.tpot_s
    roof["roofline_fraction"] = [roofline_fraction(bytes_tok, t, bandwidth, margin=NOISE_MARGIN)
                                 for t in roof.tpot_s]
    n_params = big.num_parameters()
    for row in roof.itertuples():
        s.record("decode_roofline_fraction", row.roofline_fraction, "1", model=name,
                 device="cpu", params={"loop": row.loop, "params": n_params, "bytes_per_token": bytes_tok,
                                       "read_bandwidth_gbs": round(bandwidth, 3), "threads": s.threads,
                                       "gen_len": gen_len, "noise_margin": NOISE_MARGIN})
    llc = max(env.cpu_cache_sizes().values(), default=0)
    return {"table": roof, "bandwidth": bandwidth, "bytes_per_token": bytes_tok, "params": n_params,
            "limit_s": roofline_seconds(bytes_tok, bandwidth), "llc": llc, "model": name,
            "weights_bytes": weight_bytes_per_token(cfg, 4), "margin": NOISE_MARGIN,
            "fast_fraction": float(roof.set_index("loop").loc["FastDecoder", "roofline_fraction"])}


def versus_transformers(s: Setup, hf: Any, prompt_len: int, gen_len: int, repeats: int) -> dict[str, Any]:
    """Whole generations (prefill included) of each decode loop and ``transformers.generate`` on
    the same weights, interleaved ``repeats`` times so load changes hit all alike; recorded."""
    import pandas as pd

    from labkit.inference.generate import agreed_steps, greedy

    prompt = make_prompt(s.cfg.vocab_size, prompt_len, seed=7).to(s.device)
    fast, unfused = FastDecoder(s.model), FastDecoder(s.model, fuse=False)

    def contestants(n: int) -> dict[str, Callable[[], Any]]:
        return {"generate.greedy": lambda: greedy(s.model, prompt, n).tokens,
                "FastDecoder (unfused)": lambda: unfused.greedy(prompt, n)[0],
                "FastDecoder": lambda: fast.greedy(prompt, n)[0],
                "transformers.generate": lambda: tokens_per_s_hf_generate(hf, prompt, n)[1]}

    for run in contestants(4).values():  # warm-up: first-call allocations, lazy imports
        run()
    speed: dict[str, list[float]] = {name: [] for name in contestants(gen_len)}
    outputs = {}
    for _ in range(repeats):
        for name, run in contestants(gen_len).items():
            rate, outputs[name] = tokens_per_s_ours(run, gen_len, sync=s.sync)
            speed[name].append(rate)
    levers = pd.DataFrame({"loop": list(speed), "tokens_per_s": [float(np.median(v)) for v in speed.values()],
                           "p10": [float(np.percentile(v, 10)) for v in speed.values()],
                           "p90": [float(np.percentile(v, 90)) for v in speed.values()]})
    levers["vs_generate"] = levers.tokens_per_s / levers.set_index("loop").loc["transformers.generate", "tokens_per_s"]
    for loop in ("FastDecoder", "generate.greedy"):
        s.record("speedup_vs_hf_generate", levers.set_index("loop").loc[loop, "vs_generate"], "1",
                 params={"loop": loop, "prompt_len": prompt_len, "gen_len": gen_len,
                         "threads": s.threads, "repeats": repeats})
    # identical tokens, or a first difference at a near-tie (tolerances.NEAR_TIE: 0 on a CPU);
    # the margins come from generate.greedy's logits: the same weights on the same prefix
    ref = greedy(s.model, prompt, gen_len, return_logits=True)
    tie = tolerances.NEAR_TIE.at(str(s.device))
    agree = [tuple(o.shape) == tuple(ref.tokens.shape) and agreed_steps(
        o[:, ref.prompt_length:].to(ref.tokens.device), ref.new_tokens, ref.logits, tie)[1]
        for o in outputs.values()]
    return {"table": levers, "same_tokens": all(agree),
            "speedup": float(levers.set_index("loop").loc["FastDecoder", "vs_generate"])}


# --------------------------------------------------------------------------- figures


def plot_latency(steps: pd.DataFrame, prompt_lens: Iterable[int], title: str):
    """Latency of each new token against its position, and the cumulative time, cache on/off."""
    from labkit.core import plotting

    fig, axes = plotting.new_figure(1, 2, figsize=(11, 4.2))
    for prompt_len in prompt_lens:
        for cache, style in (("on", "-"), ("off", "--")):
            sel = steps[(steps.prompt_len == prompt_len) & (steps.cache == cache)]
            decode = sel.iloc[1:]  # the first entry is the prefill (TTFT)
            label = f"prompt {prompt_len}, cache {cache}"
            axes[0].plot(decode.position, decode.ms, style, label=label)
            axes[1].plot(np.arange(len(sel)) + 1, sel.ms.cumsum() / 1e3, style, label=label)
    axes[0].set(title="Latency of each new token", xlabel="position of the new token",
                ylabel="decode step latency (ms)", yscale="log")
    axes[1].set(title="Cumulative time, prefill included", xlabel="tokens generated",
                ylabel="elapsed (s)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_memory(table: pd.DataFrame):
    """Cache bytes against context per model (log-log), with Apple's published point."""
    from matplotlib.ticker import LogLocator

    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(10, 4.6))
    for name, sel in table.groupby("model", sort=False):
        style = ":" if name.startswith("Llama 2 7B shape") else "-"
        ax.plot(sel.context, sel.bytes, style, marker="o", ms=3,
                label=f"{name} ({sel.attention.iloc[0]}, {sel.dtype_bytes.iloc[0]:g} B/value)")
    ax.plot([APPLE_CONTEXT], [APPLE_LLAMA31_8B_CACHE_GB * 1e9], "k*", ms=12,
            label="Apple: ~1 GB, Llama 3.1 8B fp16")
    ax.set(xscale="log", yscale="log", title="KV-cache size against context (batch 1)",
           xlabel="context (tokens)", ylabel="cache size")
    ax.set_xscale("log", base=2)
    ax.yaxis.set_major_locator(LogLocator(base=4))
    ax.yaxis.set_minor_locator(LogLocator(base=4, subs=()))
    ax.yaxis.set_major_formatter(plotting.bytes_formatter())
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_variants(v: dict[str, Any], window: int, model_name: str):
    """One cache update's time (concat vs in place), and bytes held (full vs sliding window)."""
    from matplotlib.ticker import MultipleLocator, NullFormatter, ScalarFormatter

    from labkit.core import plotting

    update, full, ring = v["update"], v["full_bytes"], v["window_bytes"]
    fig, axes = plotting.new_figure(1, 2, figsize=(11, 4.2))
    axes[0].plot(update.length, update.concat_us, "o-", label="grow by torch.cat (copy all)")
    axes[0].plot(update.length, update.inplace_us, "s-", label="preallocated, write in place")
    axes[0].set(xscale="log", yscale="log", title="One cache update (one layer, one token)",
                xlabel="cache length (positions)", ylabel="time per update (µs)")
    axes[0].legend()
    pos = np.arange(1, len(full) + 1)
    axes[1].plot(pos, full, label="full cache (filled part)")
    axes[1].plot(pos, ring, label=f"sliding window of {window}")
    axes[1].set(title=f"{model_name}: cache bytes as the sequence grows", xlabel="position",
                ylabel="cache size")
    axes[1].yaxis.set_major_locator(MultipleLocator(2 ** int(np.ceil(np.log2(max(full) / 6)))))
    axes[1].yaxis.set_major_formatter(plotting.bytes_formatter())
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(NullFormatter())
    axes[1].legend()
    fig.suptitle("Cache variants")
    return fig


def plot_roofline(r: dict[str, Any], threads: int):
    """Decode tokens/s of each loop against the bandwidth limit, each bar labelled with its fraction."""
    from labkit.core import plotting

    roof = r["table"]
    fig, ax = plotting.new_figure()
    ax.barh(roof.loop, roof.tokens_per_s, color=plotting.COLORS[0])
    ax.axvline(1 / r["limit_s"], color="k", ls="--",
               label=f"limit: {r['bytes_per_token'] / 1e6:.0f} MB / {r['bandwidth']:.1f} GB/s read")
    for y, (v, f) in enumerate(zip(roof.tokens_per_s, roof.roofline_fraction, strict=True)):
        ax.text(v, y, f" {f:.0%}", va="center")
    ax.set(title=f"Decode of {r['model']} ({r['params'] / 1e6:.0f} M, fp32), CPU, {threads} thread(s)",
           xlabel="decode tokens/s (transformers: prefill included)", ylabel="decode loop")
    ax.legend(loc="lower right")
    return fig


def plot_versus_transformers(levers: pd.DataFrame, limit_tok_s: float, title: str):
    """Whole-generation tokens/s per loop (median, p10-p90) with its ratio to transformers."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    y = np.arange(len(levers))
    ax.barh(y, levers.tokens_per_s, color=[plotting.COLORS[i] for i in range(len(levers))],
            xerr=[levers.tokens_per_s - levers.p10, levers.p90 - levers.tokens_per_s])
    ax.set_yticks(y, levers.loop)
    for i, r in enumerate(levers.itertuples()):
        ax.text(r.p90, i, f"  {r.vs_generate:.2f}x", va="center")
    ax.axvline(limit_tok_s, color="k", ls="--", label="bandwidth limit (decode only)")
    ax.set(title=title, xlabel="tokens/s, whole generation (median, p10-p90)", ylabel="decode loop")
    ax.legend(loc="lower right")
    return fig


# --------------------------------------------------------------------------- what the numbers say


def claims(*, equality: dict, dynamic: dict, bytes_check: dict, timings: pd.DataFrame,
           apple_bytes: int, variants_cfg: dict, variants: dict, versus: dict, model_cfg: Any,
           window: int, device: str = "cpu") -> list[tuple[str, bool | None, str]]:
    """The study's claims as (claim, verdict, the value it rests on), each computed from this
    run's measurements (the notebook checks them with ``labkit.core.claims``). Bounds are
    ``device``'s (``tolerances``); a speed claim's verdict is None where the hardware does not
    make it physical (``tolerances.CACHE_SPEEDUP``): reported, not asserted."""
    from labkit.core.plotting import format_bytes

    on = timings[timings.cache == "on"].set_index("prompt_len")
    off = timings[timings.cache == "off"].set_index("prompt_len")
    longest = int(on.index.max())
    speedups = off.total_s / on.total_s
    size = {k: kv_cache_bytes_for_config(c, 4096, 2) for k, c in variants_cfg.items()}
    last = variants["update"].iloc[-1]
    same_math, faster = tolerances.SAME_MATH.at(device), tolerances.CACHE_SPEEDUP
    window_bytes = tensor_bytes(variants["window_cache"])
    return [
        ("the cache changes no token (greedy decoding)", bool(equality["tokens_identical"]),
         f"max |logit difference| {equality['logit_gap']:.1e}"),
        (f"ours matches transformers' DynamicCache within {same_math:.0e}".replace("e-0", "e-"),
         bool(dynamic["gap"] <= same_math),
         f"max |logit difference| {dynamic['gap']:.1e} over {dynamic['steps']} steps"),
        ("the byte formula equals the real tensors' bytes",
         bytes_check["formula"] == bytes_check["real"] and bytes_check["shape"] == bytes_check["expected_shape"],
         f"{bytes_check['formula']:,} = {bytes_check['real']:,} bytes"),
        ("the cache makes the whole generation faster at every prompt length",
         faster.verdict(device, (speedups > 1).all()), f"x{speedups.min():.1f} to x{speedups.max():.1f}"),
        (f"without the cache a decode step at prompt {longest} is slower than with it",
         faster.verdict(device, off.loc[longest, "tpot_ms"] > on.loc[longest, "tpot_ms"]),
         f"{off.loc[longest, 'tpot_ms']:.2f} vs {on.loc[longest, 'tpot_ms']:.2f} ms per token"),
        (f"Llama 3.1 8B's cache at {APPLE_CONTEXT} tokens in fp16 is Apple's 'about 1 GB'",
         abs(apple_bytes / 1e9 - APPLE_LLAMA31_8B_CACHE_GB) <= 0.1, f"{apple_bytes / 1e9:.2f} GB"),
        ("at equal width, MHA's cache is 4x GQA(4)'s and 32x MQA's",
         size["MHA"] == 4 * size["GQA"] == 32 * size["MQA"],
         " / ".join(format_bytes(size[k]) for k in ("MHA", "GQA", "MQA")) + " at 4096 tokens"),
        ("growing the cache by torch.cat changes no token", bool(variants["same_tokens"]),
         f"{variants['e2e']['concat'][1].numel()} tokens, in place against concatenated"),
        (f"growing by torch.cat costs more per update than writing in place at "
         f"{int(last.length)} positions", bool(last.concat_us > last.inplace_us),
         f"{last.concat_us:.1f} vs {last.inplace_us:.1f} µs"),
        ("the sliding window's memory stays fixed",
         window_bytes == kv_cache_bytes_for_config(model_cfg, window, 4) == variants["window_bytes"][-1],
         f"{format_bytes(window_bytes)} for {window} positions"),
        ("labkit's decode loops and transformers.generate choose identical tokens",
         bool(versus["same_tokens"]), f"{len(versus['table'])} loops compared"),
    ]


# --------------------------------------------------------------------------- bench


def bench(quick: bool = False, model: str = "tiny-llama") -> list[dict]:
    """`labkit bench kv-cache`: the notebook's measurements on ``model``, recorded the same way
    under study 01_kv_cache (cache bytes, latency with and without the cache, the roofline and
    the comparison with transformers.generate). CPU only."""
    from labkit.models import load

    s = setup(model, "cpu", (1, 2))
    hf = load(model, device="cpu", impl="hf").model  # every input loaded before the first record
    table, _, _ = memory_table(s.cfg, model, (1024, 4096, 8192), cache_bytes_check(s.model)["dtype_bytes"])
    record_memory_table(s, table)
    latency_sweep(s, (16, 64) if quick else (16, 64, 256), 32 if quick else 128)
    roofline(s, "quick" if quick else "full", 16 if quick else 32, quick)
    versus_transformers(s, hf, 32, 128, 2 if quick else 3)
    return s.records
