"""MODEL_CARD.md for a trained folder: every number read from its logs or computed here.

Inputs: the folder's ``training_log.json`` (written by the trainer, on whatever machine),
``config.json``, ``model.safetensors``, optional ``device_lease.json`` (what the device tool
reported) and optional ``eval_breakdown.json`` (see :func:`heldout_breakdown`). Greedy samples
are generated here by the folder itself, through transformers, on CPU.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

# Prompts end at the end of a line WITHOUT its newline: the BPE merges a newline with the next
# line's indentation ("\n" + "   " is one token), so a prompt ending in "\n" asks the model to
# continue from a token split it has rarely seen (the prompt-boundary problem).
SAMPLE_PROMPTS: tuple[str, ...] = (
    "def fibonacci(n):",
    "import os\n\n\ndef list_python_files(root):",
    "class Stack:\n    def __init__(self):",
    "    def forward(self, hidden_states):",
    'if __name__ == "__main__":',
)
SAMPLE_NEW_TOKENS = 64


def greedy_samples(model_dir: Path, prompts=SAMPLE_PROMPTS, new_tokens=SAMPLE_NEW_TOKENS):
    """(prompt, completion) pairs from transformers' greedy generate on CPU, fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=new_tokens,
                do_sample=False,
            )
        out.append(
            (prompt, tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
        )
    return out


def heldout_breakdown(model_dir: Path, data_dir: Path, seq_len: int = 1024) -> dict:
    """Two checks on how far the held-out files are from the train files.

    1. Verbatim line overlap per package: the share of a held-out package's non-trivial lines
       (stripped, >= 20 characters) that occur somewhere in the train split. Library code copies
       itself (transformers' "Copied from" blocks), so whole-file splits still leak lines.
    2. Held-out loss on the standard-library files alone (the least duplicated source), in fp32
       on CPU, beside the unigram baseline on the same targets.
    """
    import numpy as np
    import torch

    from labkit.train import corpus, loop, tokenizer

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    files = {f.path: f for f in corpus.collect()}
    missing = [e["path"] for e in manifest["files"] if e["path"] not in files]
    if missing:
        raise FileNotFoundError(
            f"{data_dir}/manifest.json names {len(missing)} files not installed here "
            f"(first: {missing[0]}); the breakdown needs the same package versions"
        )

    def text(e: dict) -> str:
        return files[e["path"]].abspath.read_text(encoding="utf-8")

    def lines(t: str) -> set[str]:
        return {s for s in (x.strip() for x in t.splitlines()) if len(s) >= 20}

    train_lines: set[int] = set()
    for e in manifest["files"]:
        if e["split"] == "train":
            train_lines.update(hash(s) for s in lines(text(e)))
    overlap: dict[str, dict] = {}
    stdlib_docs = []
    for e in manifest["files"]:
        if e["split"] != "heldout":
            continue
        t = text(e)
        ls = lines(t)
        o = overlap.setdefault(e["package"], {"files": 0, "lines": 0, "lines_in_train": 0})
        o["files"] += 1
        o["lines"] += len(ls)
        o["lines_in_train"] += sum(hash(s) in train_lines for s in ls)
        if e["package"] == "stdlib":
            stdlib_docs.append(t)
    for o in overlap.values():
        o["share_in_train"] = o["lines_in_train"] / max(1, o["lines"])
    tot_lines = sum(o["lines"] for o in overlap.values())
    tot_in = sum(o["lines_in_train"] for o in overlap.values())

    tok = tokenizer.load(model_dir)
    stream = np.fromiter(
        (i for d in tokenizer.encode_documents(tok, stdlib_docs) for i in d), dtype=np.int64
    )
    x, y = loop.heldout_windows(stream, seq_len)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    class _Logits(torch.nn.Module):  # evaluate() expects model(x) -> logits
        def forward(self, ids):
            return model(ids).logits

    res = loop.evaluate(_Logits(), x, y, torch.device("cpu"), 4, autocast=False)
    with np.load(Path(data_dir) / "tokens.npz") as z:
        train_tokens = z["train"]
    uni = loop.unigram_baseline(train_tokens, y, tok.get_vocab_size())
    out = {
        "line_overlap": {
            "per_package": overlap,
            "all_heldout": {
                "lines": tot_lines,
                "lines_in_train": tot_in,
                "share_in_train": tot_in / max(1, tot_lines),
            },
        },
        "stdlib_heldout": {
            "files": len(stdlib_docs),
            "windows": int(len(x)),
            "model": res,
            "unigram": uni,
            "ppl_ratio_unigram_over_model": uni["ppl"] / res["ppl"],
            "eval": "transformers LlamaForCausalLM, float32, CPU",
        },
        "manifest_hash": manifest["manifest_hash"],
    }
    _write_atomic(Path(model_dir) / "eval_breakdown.json", json.dumps(out, indent=2) + "\n")
    return out


def write_card(model_dir: Path, data_dir: Path | None = None, samples: bool = True) -> Path:
    """Render MODEL_CARD.md from the folder's JSON files (and greedy samples made now)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    log = json.loads((model_dir / "training_log.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    lease_path = model_dir / "device_lease.json"
    lease = json.loads(lease_path.read_text()) if lease_path.is_file() else None
    bd_path = model_dir / "eval_breakdown.json"
    bd = json.loads(bd_path.read_text()) if bd_path.is_file() else None
    st_path = model_dir / "model.safetensors"
    n_params, dtypes = 0, set()
    with safe_open(str(st_path), framework="pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            n_params += math.prod(t.get_shape())
            dtypes.add(t.get_dtype())
    c, fin, tc = log["corpus"], log["final"], log["config"]
    dims = sorted(
        {
            cfg["vocab_size"],
            cfg["hidden_size"],
            cfg["intermediate_size"],
            cfg["num_attention_heads"] * cfg["head_dim"],
            cfg["num_key_value_heads"] * cfg["head_dim"],
        }
    )
    mult64 = all(d % 64 == 0 for d in dims)
    L = []
    w = L.append
    w(f"# {model_dir.name} ({cfg['model_type']}, {n_params / 1e6:.1f} M parameters)\n")
    if tc["name"] != "shipped":
        w(
            f"Trained with the '{tc['name']}' configuration: a demonstration of the pipeline, "
            "not the shipped model (data/models/tiny-llama).\n"
        )
    w(
        "A small Llama-architecture decoder trained from scratch on Python source, shipped so that "
        "every study of the lab has real weights offline. It completes Python; it is not an "
        "assistant. Every number below is read from `training_log.json`, `config.json`, "
        "`model.safetensors`, `eval_breakdown.json` or `device_lease.json` by "
        "`labkit/train/card.py`, which wrote this file.\n"
    )
    w("## Files\n")
    w("| file | what |\n| --- | --- |")
    w(
        f"| model.safetensors | weights, {', '.join(sorted(dtypes))}, {st_path.stat().st_size:,} bytes; "
        "tied embeddings: no `lm_head.weight`, the output reuses `model.embed_tokens.weight` |"
    )
    w("| config.json | `LlamaForCausalLM` config (labkit's `LlamaConfig.to_hf_dict()`) |")
    w("| tokenizer.json, tokenizer_config.json | byte-level BPE (PreTrainedTokenizerFast) |")
    w("| generation_config.json | greedy, stops at `<|eos|>` |")
    w("| training_log.json | config, every evaluation, throughput, final metrics |")
    w(
        f"| heldout_slice.safetensors | {fin['slice']['windows']} held-out windows of "
        f"{tc['seq_len'] + 1} token ids (int32), for the test that recomputes the slice loss |"
    )
    if bd:
        w("| eval_breakdown.json | held-out line overlap with train, standard-library-only loss |")
    if lease:
        w("| device_lease.json | device time, as the device tool reported it |")
    w("")
    w("## Corpus\n")
    w(
        f"- Manifest hash `{c['manifest_hash']}` (sha256 over path, file sha256 and split of every "
        "file; `data/corpus/manifest.json` after `python -m labkit.train prepare`)."
    )
    w(
        f"- Python {c['python']} standard library (no tests, idlelib, lib2to3, ensurepip, "
        "turtledemo) plus the `.py` files of these installed distributions, tests and test "
        "tooling left out: " + ", ".join(f"{k} {v}" for k, v in c["package_versions"].items()) + "."
    )
    w(
        "- Identical files kept once (sha256); a file is held out when "
        "`int(sha256(path)[:8], 16) % 1000 < 25`, so the split is by whole files.\n"
    )
    w("| split | files | bytes | tokens | bytes/token |\n| --- | --- | --- | --- | --- |")
    for s in ("train", "heldout"):
        w(
            f"| {s} | {c['files'][s]:,} | {c['bytes'][s]:,} | {c['tokens'][s]:,} | "
            f"{c['bytes_per_token'][s]:.2f} |"
        )
    w(
        "\nTokens count `<|bos|>` and `<|eos|>` around each file. The corpus depends on the "
        "installed versions: another machine rebuilds the same corpus only when its manifest hash "
        "matches.\n"
    )
    w("## Tokenizer\n")
    w(
        f"Byte-level BPE trained with `tokenizers` on the train split only, vocabulary "
        f"{c['vocab_size']:,}: ByteLevel pre-tokenizer (`add_prefix_space=False`, "
        "`use_regex=True`, the GPT-2 split), ByteLevel decoder, no normalizer, so any text "
        "round-trips byte for byte and llama.cpp can read it as a `gpt-2` tokenizer.\n"
    )
    w("| token | id | use |\n| --- | --- | --- |")
    w(
        "| `<|bos|>` | 0 | starts every document; prepended by the post-processor (`add_special_tokens=True`) |"
    )
    w("| `<|eos|>` | 1 | ends every document; generation stops on it |")
    w("| `<|pad|>` | 2 | padding only, never trained on |")
    w("\nNo unknown token: all 256 bytes are in the vocabulary.\n")
    w("## Architecture\n")
    w("| | |\n| --- | --- |")
    w(f"| parameters | {n_params:,} (counted from model.safetensors) |")
    w(f"| layers | {cfg['num_hidden_layers']} |")
    w(f"| hidden size | {cfg['hidden_size']} |")
    w(
        f"| attention | {cfg['num_attention_heads']} query heads, {cfg['num_key_value_heads']} KV heads "
        f"(grouped-query), head_dim {cfg['head_dim']}, RoPE theta {cfg['rope_theta']:g} |"
    )
    w(f"| MLP | SwiGLU, intermediate size {cfg['intermediate_size']} |")
    w(f"| norm | RMSNorm, eps {cfg['rms_norm_eps']:g} |")
    w(f"| context | {cfg['max_position_embeddings']} tokens (trained at {tc['seq_len']}) |")
    w(f"| vocabulary | {cfg['vocab_size']}, input and output embeddings tied |")
    w(
        f"| weight dimensions | {', '.join(map(str, dims))}: "
        f"{'all' if mult64 else 'NOT all'} multiples of 64 |"
    )
    w(f"| storage | {', '.join(sorted(dtypes))}: {log['final']['weights']} |")
    w(
        "\nWhy fp16 storage: half the bytes of fp32, 3 more mantissa bits than bf16, read by every "
        "export target; loaders upcast. The metrics below are of these stored weights.\n"
    )
    w("## Training\n")
    w(
        f"- Code: `labkit.train` (`python -m labkit.train fit --config {tc['name']}`), labkit's own "
        "Llama (`labkit.models.llama`), seed "
        f"{tc['seed']}."
    )
    w(
        f"- AdamW (betas {tc['betas'][0]}, {tc['betas'][1]}), peak lr {tc['lr']:g}, "
        f"{tc['warmup_steps']} warm-up steps then cosine to {tc['min_lr_ratio']:g} x peak, "
        f"weight decay {tc['weight_decay']:g} on matrices, gradient clip {tc['grad_clip']:g}, "
        f"dropout {tc['dropout']:g} on attention and MLP outputs (forward hooks; not in the "
        "shipped graph), bf16 autocast" + (", torch.compile" if log["compiled"] else "") + "."
    )
    w(
        f"- Batch {tc['batch_size']} x {tc['seq_len']} = {log['tokens_per_step']:,} tokens per step; "
        f"{log['steps']:,} steps ({log['stopped_by']}), {log['tokens_seen']:,} tokens seen "
        f"= {log['epochs_seen']:.1f} passes over the train split."
    )
    w(
        f"- Checkpoint: the best held-out loss among {len(log['evals'])} evaluations "
        f"(every {tc['eval_every']} steps): step {log['best']['step']:,} "
        f"({log['best']['tokens_seen']:,} tokens seen)."
    )
    w(
        f"- Hardware: {log['device']}, torch {log['torch']}. Training wall time "
        f"{log['wall_seconds']:.1f} s (compile and {log['eval_seconds']:.1f} s of evaluation "
        f"included); whole command {log['command_seconds']:.1f} s."
    )
    steady = log["tokens_per_second_steady"]
    w(
        f"- Throughput: {steady:,.0f} tokens/s over the training steps, "
        f"{log['tokens_per_second_overall']:,.0f} tokens/s over the whole training wall time."
    )
    if lease:
        used = lease["session_budget_s"] - lease["budget_left_s_after_give_back"]
        w(
            f"- Device time: {used / 60:.1f} min of the session's {lease['session_budget_s'] / 60:.0f} "
            f"(machine start, {lease['calls']} call of {lease['command_wall_s']:.0f} s, transfers), "
            "as the device tool reported it (device_lease.json)."
        )
    w(
        "\n| step | tokens seen | train loss | held-out loss | held-out ppl |\n| --- | --- | --- | --- | --- |"
    )
    shown = log["evals"][:: max(1, len(log["evals"]) // 8)]
    if shown[-1] is not log["evals"][-1]:
        shown.append(log["evals"][-1])
    for e in shown:
        tl = f"{e['train_loss']:.3f}" if e["train_loss"] is not None else "-"
        w(
            f"| {e['step']:,} | {e['tokens_seen']:,} | {tl} | {e['heldout_loss']:.4f} | "
            f"{e['heldout_ppl']:.2f} |"
        )
    w("\n(bf16 autocast during training; the final numbers below are fp32.)\n")
    w("## Held-out results\n")
    h, u = fin["heldout"], fin["unigram"]
    w(
        f"Scored targets: every next token of {fin['heldout_windows']} non-overlapping windows of "
        f"{tc['seq_len']} over the held-out stream, except `<|bos|>` targets "
        f"({h['targets']:,} targets). Evaluated on {fin['eval_device']}.\n"
    )
    w("| | loss (nats/token) | perplexity |\n| --- | --- | --- |")
    w(f"| tiny-llama | {h['loss']:.4f} | {h['ppl']:.2f} |")
    w(
        f"| unigram baseline (train-split token frequencies, add-one) | {u['loss']:.4f} | {u['ppl']:.1f} |"
    )
    w(
        f"\nThe model's held-out perplexity is 1/{fin['ppl_ratio_unigram_over_model']:.0f} of the "
        f"unigram baseline's (target: at most 1/20): "
        f"{'met' if fin['ppl_ratio_unigram_over_model'] >= 20 else 'NOT met'}.\n"
    )
    s = fin["slice"]
    w(
        f"Slice shipped in heldout_slice.safetensors ({s['windows']} windows, {s['targets']:,} "
        f"targets): loss {s['loss']:.6f}, perplexity {s['ppl']:.4f} (unigram {s['unigram']['ppl']:.1f}). "
        "tests/test_train.py recomputes it with transformers on CPU.\n"
    )
    if bd:
        lo = bd["line_overlap"]
        sb = bd["stdlib_heldout"]
        w("### How independent is the held-out split?\n")
        w(
            f"Whole files are held out, but library code repeats itself: "
            f"{100 * lo['all_heldout']['share_in_train']:.1f} % of the held-out files' non-trivial "
            "lines (stripped, >= 20 characters) also occur verbatim somewhere in the train split.\n"
        )
        w("| package | held-out files | lines | share also in train |\n| --- | --- | --- | --- |")
        for pkg, o in sorted(lo["per_package"].items(), key=lambda kv: -kv[1]["lines"]):
            w(f"| {pkg} | {o['files']} | {o['lines']:,} | {100 * o['share_in_train']:.1f} % |")
        w(
            f"\nSo the full held-out perplexity flatters the model. On the standard-library held-out "
            f"files alone ({sb['files']} files, {sb['model']['targets']:,} targets, "
            f"{sb['eval']}): loss {sb['model']['loss']:.4f}, perplexity {sb['model']['ppl']:.2f} "
            f"against a unigram perplexity of {sb['unigram']['ppl']:.1f} on the same targets "
            f"(1/{sb['ppl_ratio_unigram_over_model']:.0f}).\n"
        )
    if samples:
        w("## Greedy completions\n")
        w(
            f"Generated when this card was written: transformers `generate`, greedy, "
            f"{SAMPLE_NEW_TOKENS} new tokens, fp32 on CPU; prompt and completion printed together. "
            "Prompts end without their newline: the tokenizer merges a newline with the next "
            "line's indentation, so a trailing newline would split a token the model rarely "
            "sees split. Greedy decoding of a model this small repeats itself once it runs out "
            "of ideas.\n"
        )
        for prompt, completion in greedy_samples(model_dir):
            w("```python")
            w(prompt + completion)
            w("```")
            w(f"(prompt: {json.dumps(prompt)})\n")
    w("## Use\n")
    w(
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'tok = AutoTokenizer.from_pretrained("data/models/tiny-llama")\n'
        'model = AutoModelForCausalLM.from_pretrained("data/models/tiny-llama")\n'
        'ids = tok("def add(a, b):\\n", return_tensors="pt")\n'
        "print(tok.decode(model.generate(**ids, max_new_tokens=32, do_sample=False)[0]))\n```\n"
    )
    w("## Limits\n")
    w(
        "- Trained on library source only: no prose, no other languages; it imitates the style of "
        "the standard library, torch, transformers and pandas, including their docstrings."
    )
    w(
        "- The held-out split shares many verbatim lines with train (above); read the "
        "standard-library number for code it has not seen."
    )
    w(
        "- Retraining reproduces these weights only on the same corpus (manifest hash), seed, "
        "device type and library versions."
    )
    path = model_dir / "MODEL_CARD.md"
    _write_atomic(path, "\n".join(L) + "\n")
    return path


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
