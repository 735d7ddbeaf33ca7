"""vLLM worker: runs inside vLLM's own virtual environment, driven by ``labkit.runtimes.vllm_rt``.

Why a separate process: vLLM's CPU build pins its own torch and transformers, so it lives in its
own venv (``build/venvs/vllm``); this file imports nothing from labkit. It builds one offline
``vllm.LLM`` (no server, no network: a local folder, ``HF_HUB_OFFLINE=1``) and answers one JSON
request per stdin line with one JSON line on stdout (vLLM's own logs go to stderr).

Requests (``op``):

* ``info`` -> vLLM version, the KV cache vLLM reserved (blocks, block size, bytes), config.
* ``generate`` -> greedy generation of several token-id prompts in one ``LLM.generate`` call
  (vLLM schedules them with continuous batching, ``max_num_seqs`` at a time): generated tokens,
  each token's log-probability, the wall time of the call.
* ``prefill_logprobs`` -> log-probabilities over the whole vocabulary after a prompt (one
  generated token; vLLM exposes log-softmax values, not raw logits).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _build(args: dict):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # in-process engine core, so the cache config that the engine filled in is readable here
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    extra = {}
    if "enable_prefix_caching" in args:  # absent: vLLM's default (on)
        extra["enable_prefix_caching"] = bool(args["enable_prefix_caching"])
    if "kv_cache_memory_bytes" in args:  # absent: VLLM_CPU_KVCACHE_SPACE (whole GiB)
        extra["kv_cache_memory_bytes"] = int(args["kv_cache_memory_bytes"])
    return LLM(
        model=args["model"],
        tokenizer=args["model"],
        dtype=args.get("dtype", "float32"),
        max_model_len=int(args["max_model_len"]),
        max_num_seqs=int(args.get("max_num_seqs", 8)),
        block_size=int(args.get("block_size", 32)),
        seed=int(args.get("seed", 0)),
        enforce_eager=True,
        trust_remote_code=False,
        max_logprobs=int(args.get("max_logprobs", 20)),
        **extra,
    )


def _info(llm) -> dict:
    import vllm

    cache = llm.llm_engine.vllm_config.cache_config
    model_cfg = llm.llm_engine.vllm_config.model_config
    hf = model_cfg.hf_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * hf.head_dim * 4
    dtype_bytes = {"torch.float32": 4, "torch.float16": 2, "torch.bfloat16": 2}.get(
        str(model_cfg.dtype), None
    )
    if dtype_bytes:
        per_token = per_token // 4 * dtype_bytes
    return {
        "vllm_version": vllm.__version__,
        "num_blocks": blocks,
        "block_size": cache.block_size,
        "kv_bytes_per_token": per_token,
        "kv_reserved_bytes": None if blocks is None else int(blocks) * cache.block_size * per_token,
        "cpu_kvcache_space_env": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "kv_cache_memory_bytes": getattr(cache, "kv_cache_memory_bytes", None),
        "dtype": str(model_cfg.dtype),
    }


def _generate(llm, req: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in req["prompts"]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True, logprobs=0)
        for n in req["max_tokens"]
    ]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens, logprobs = [], []
    for o in outs:
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        lp = []
        for tok, d in zip(c.token_ids, c.logprobs or [], strict=False):
            lp.append(float(d[tok].logprob) if tok in d else None)
        logprobs.append(lp)
    return {"tokens": tokens, "logprobs": logprobs, "wall_s": wall}


def _prefill_logprobs(llm, req: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    k = int(req["top"])
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=k)
    t0 = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=list(req["prompt"]))], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    d = out[0].outputs[0].logprobs[0]
    return {"ids": [int(i) for i in d], "logprobs": [float(v.logprob) for v in d.values()],
            "wall_s": wall}


def main() -> None:
    args = json.loads(sys.stdin.readline())
    out = sys.stdout
    sys.stdout = sys.stderr  # anything vLLM prints stays off the protocol channel
    try:
        llm = _build(args)
        out.write(json.dumps({"ok": True, **_info(llm)}) + "\n")
    except Exception as e:  # noqa: BLE001 - the reason goes back to the adapter verbatim
        out.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        raise
    out.flush()
    ops = {"generate": _generate, "prefill_logprobs": _prefill_logprobs,
           "info": lambda llm, _req: _info(llm)}
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            reply = {"ok": True, **ops[req["op"]](llm, req)}
        except Exception as e:  # noqa: BLE001
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
