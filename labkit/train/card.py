"""MODEL_CARD.md for a trained folder: every number read from its logs or computed here.

Inputs: the folder's ``training_log.json`` (written by the trainer, on whatever machine),
``config.json``, ``model.safetensors``, optional ``device_lease.json`` (what the device tool
reported) and optional ``eval_breakdown.json`` (see :func:`heldout_breakdown`). Greedy samples
are generated here by the folder itself, through transformers, on CPU.

The card's prose is a template shipped beside this module (``MODEL_CARD.md.tmpl``), so what the
card says can be read and edited as Markdown; the functions below compute only the values it
shows, one function per section. A block between ``<!-- when NAME -->`` and ``<!-- end NAME -->``
lines appears only when the folder has what it describes (NAME: ``not_shipped``, ``lease``,
``breakdown``, ``samples``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from labkit.core import files

TEMPLATE = "MODEL_CARD.md.tmpl"

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


# --- the held-out breakdown ----------------------------------------------------------------------


def _long_lines(text: str) -> set[str]:
    """The non-trivial lines of a file: stripped, at least 20 characters."""
    return {s for s in (x.strip() for x in text.splitlines()) if len(s) >= 20}


def line_overlap(manifest: dict, text_of: Callable[[dict], str]) -> dict:
    """Per package of the held-out split: files, non-trivial lines, and how many of those lines
    occur verbatim somewhere in the train split (library code copies itself, as transformers'
    "Copied from" blocks, so whole-file splits still leak lines). ``text_of(entry)`` reads a
    manifest entry's file."""
    train_lines: set[int] = set()
    for e in manifest["files"]:
        if e["split"] == "train":
            train_lines.update(hash(s) for s in _long_lines(text_of(e)))
    overlap: dict[str, dict] = {}
    for e in manifest["files"]:
        if e["split"] != "heldout":
            continue
        ls = _long_lines(text_of(e))
        o = overlap.setdefault(e["package"], {"files": 0, "lines": 0, "lines_in_train": 0})
        o["files"] += 1
        o["lines"] += len(ls)
        o["lines_in_train"] += sum(hash(s) in train_lines for s in ls)
    for o in overlap.values():
        o["share_in_train"] = o["lines_in_train"] / max(1, o["lines"])
    tot_lines = sum(o["lines"] for o in overlap.values())
    tot_in = sum(o["lines_in_train"] for o in overlap.values())
    return {
        "per_package": overlap,
        "all_heldout": {
            "lines": tot_lines,
            "lines_in_train": tot_in,
            "share_in_train": tot_in / max(1, tot_lines),
        },
    }


def stdlib_heldout(model_dir: Path, data_dir: Path, docs: list[str], seq_len: int) -> dict:
    """Held-out loss of the folder on ``docs`` (the standard library's held-out files, the least
    duplicated source), in fp32 on CPU through transformers, beside the unigram baseline."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from labkit.train import loop, tokenizer

    tok = tokenizer.load(model_dir)
    stream = np.fromiter(
        (i for d in tokenizer.encode_documents(tok, docs) for i in d), dtype=np.int64
    )
    x, y = loop.heldout_windows(stream, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    class _Logits(torch.nn.Module):  # evaluate() expects model(x) -> logits
        def forward(self, ids):
            return model(ids).logits

    res = loop.evaluate(_Logits(), x, y, torch.device("cpu"), 4, autocast=False)
    with np.load(Path(data_dir) / "tokens.npz") as z:
        train_tokens = z["train"]
    uni = loop.unigram_baseline(train_tokens, y, tok.get_vocab_size())
    return {
        "files": len(docs),
        "windows": int(len(x)),
        "model": res,
        "unigram": uni,
        "ppl_ratio_unigram_over_model": uni["ppl"] / res["ppl"],
        "eval": "transformers LlamaForCausalLM, float32, CPU",
    }


def heldout_breakdown(model_dir: Path, data_dir: Path, seq_len: int = 1024) -> dict:
    """Two checks on how far the held-out files are from the train files, written to
    ``eval_breakdown.json``: :func:`line_overlap` per package, and :func:`stdlib_heldout`.

    Needs the same installed package versions as the corpus (the manifest names the files).
    """
    from labkit.train import corpus

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    installed = {f.path: f for f in corpus.collect()}
    missing = [e["path"] for e in manifest["files"] if e["path"] not in installed]
    if missing:
        raise FileNotFoundError(
            f"{data_dir}/manifest.json names {len(missing)} files not installed here "
            f"(first: {missing[0]}); the breakdown needs the same package versions"
        )

    def text_of(e: dict) -> str:
        return installed[e["path"]].abspath.read_text(encoding="utf-8")

    stdlib_docs = [
        text_of(e) for e in manifest["files"] if e["split"] == "heldout" and e["package"] == "stdlib"
    ]
    out = {
        "line_overlap": line_overlap(manifest, text_of),
        "stdlib_heldout": stdlib_heldout(model_dir, data_dir, stdlib_docs, seq_len),
        "manifest_hash": manifest["manifest_hash"],
    }
    files.atomic_write_text(Path(model_dir) / "eval_breakdown.json", json.dumps(out, indent=2) + "\n")
    return out


# --- the card: inputs, one function of values per section, the template -------------------------


@dataclass(frozen=True)
class CardInputs:
    """What a card is computed from: the folder's JSON files and its weights' header."""

    name: str
    log: dict
    config: dict
    lease: dict | None
    breakdown: dict | None
    n_params: int
    dtypes: str  # the stored dtypes, e.g. "F16"
    weights_bytes: int

    @classmethod
    def read(cls, model_dir: Path) -> CardInputs:
        from safetensors import safe_open

        model_dir = Path(model_dir)

        def optional(name: str) -> dict | None:
            path = model_dir / name
            return json.loads(path.read_text()) if path.is_file() else None

        st_path = model_dir / "model.safetensors"
        n_params, dtypes = 0, set()
        with safe_open(str(st_path), framework="pt") as f:
            for k in f.keys():
                t = f.get_slice(k)
                n_params += math.prod(t.get_shape())
                dtypes.add(t.get_dtype())
        return cls(
            name=model_dir.name,
            log=json.loads((model_dir / "training_log.json").read_text()),
            config=json.loads((model_dir / "config.json").read_text()),
            lease=optional("device_lease.json"),
            breakdown=optional("eval_breakdown.json"),
            n_params=n_params,
            dtypes=", ".join(sorted(dtypes)),
            weights_bytes=st_path.stat().st_size,
        )


def files_values(c: CardInputs) -> dict[str, Any]:
    """The title and the table of the folder's files."""
    tc = c.log["config"]
    return {
        "name": c.name,
        "model_type": c.config["model_type"],
        "params_m": f"{c.n_params / 1e6:.1f}",
        "config_name": tc["name"],
        "dtypes": c.dtypes,
        "weights_bytes": f"{c.weights_bytes:,}",
        "slice_windows": c.log["final"]["slice"]["windows"],
        "window_tokens": tc["seq_len"] + 1,
    }


def corpus_values(c: CardInputs) -> dict[str, Any]:
    """The corpus: manifest, sources, splits; and the tokenizer's vocabulary."""
    corpus = c.log["corpus"]
    rows = [
        f"| {s} | {corpus['files'][s]:,} | {corpus['bytes'][s]:,} | {corpus['tokens'][s]:,} | "
        f"{corpus['bytes_per_token'][s]:.2f} |"
        for s in ("train", "heldout")
    ]
    return {
        "manifest_hash": corpus["manifest_hash"],
        "python": corpus["python"],
        "package_versions": ", ".join(f"{k} {v}" for k, v in corpus["package_versions"].items()),
        "split_rows": "\n".join(rows),
        "corpus_vocab": f"{corpus['vocab_size']:,}",
    }


def architecture_values(c: CardInputs) -> dict[str, Any]:
    """The architecture table, with the check that every weight dimension is a multiple of 64
    (what the accelerators' tiles want)."""
    cfg = c.config
    dims = sorted(
        {
            cfg["vocab_size"],
            cfg["hidden_size"],
            cfg["intermediate_size"],
            cfg["num_attention_heads"] * cfg["head_dim"],
            cfg["num_key_value_heads"] * cfg["head_dim"],
        }
    )
    return {
        "n_params": f"{c.n_params:,}",
        "layers": cfg["num_hidden_layers"],
        "hidden_size": cfg["hidden_size"],
        "heads": cfg["num_attention_heads"],
        "kv_heads": cfg["num_key_value_heads"],
        "head_dim": cfg["head_dim"],
        "rope_theta": f"{cfg['rope_theta']:g}",
        "intermediate_size": cfg["intermediate_size"],
        "rms_norm_eps": f"{cfg['rms_norm_eps']:g}",
        "max_positions": cfg["max_position_embeddings"],
        "seq_len": c.log["config"]["seq_len"],
        "vocab_size": cfg["vocab_size"],
        "dims": ", ".join(map(str, dims)),
        "dims_all": "all" if all(d % 64 == 0 for d in dims) else "NOT all",
        "storage": c.log["final"]["weights"],
    }


def training_values(c: CardInputs) -> dict[str, Any]:
    """The training bullets: optimiser, schedule, batches, checkpoint, hardware, throughput."""
    log, tc = c.log, c.log["config"]
    return {
        "seed": tc["seed"],
        "beta1": tc["betas"][0],
        "beta2": tc["betas"][1],
        **{k: f"{tc[k]:g}" for k in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "dropout")},
        "warmup_steps": tc["warmup_steps"],
        "compiled": ", torch.compile" if log["compiled"] else "",
        "batch_size": tc["batch_size"],
        "tokens_per_step": f"{log['tokens_per_step']:,}",
        "steps": f"{log['steps']:,}",
        "stopped_by": log["stopped_by"],
        "tokens_seen": f"{log['tokens_seen']:,}",
        "epochs_seen": f"{log['epochs_seen']:.1f}",
        "n_evals": len(log["evals"]),
        "eval_every": tc["eval_every"],
        "best_step": f"{log['best']['step']:,}",
        "best_tokens_seen": f"{log['best']['tokens_seen']:,}",
        "device": log["device"],
        "torch": log["torch"],
        **{k: f"{log[k]:.1f}" for k in ("wall_seconds", "eval_seconds", "command_seconds")},
        "tokens_per_second_steady": f"{log['tokens_per_second_steady']:,.0f}",
        "tokens_per_second_overall": f"{log['tokens_per_second_overall']:,.0f}",
        "eval_rows": eval_rows(log["evals"]),
    }


def eval_rows(evals: list[dict], most: int = 8) -> str:
    """About ``most`` evenly spaced rows of the evaluation table, the last evaluation always."""
    shown = evals[:: max(1, len(evals) // most)]
    if shown[-1] is not evals[-1]:
        shown.append(evals[-1])
    rows = []
    for e in shown:
        tl = f"{e['train_loss']:.3f}" if e["train_loss"] is not None else "-"
        rows.append(
            f"| {e['step']:,} | {e['tokens_seen']:,} | {tl} | {e['heldout_loss']:.4f} | "
            f"{e['heldout_ppl']:.2f} |"
        )
    return "\n".join(rows)


def lease_values(lease: dict) -> dict[str, Any]:
    """Device time, as the device tool reported it."""
    used = lease["session_budget_s"] - lease["budget_left_s_after_give_back"]
    return {
        "lease_used_min": f"{used / 60:.1f}",
        "lease_budget_min": f"{lease['session_budget_s'] / 60:.0f}",
        "lease_calls": lease["calls"],
        "lease_wall_s": f"{lease['command_wall_s']:.0f}",
    }


def heldout_values(c: CardInputs) -> dict[str, Any]:
    """The held-out results: model against the unigram baseline, and the shipped slice."""
    fin = c.log["final"]
    h, u, s = fin["heldout"], fin["unigram"], fin["slice"]
    ratio = fin["ppl_ratio_unigram_over_model"]
    return {
        "heldout_windows": fin["heldout_windows"],
        "heldout_targets": f"{h['targets']:,}",
        "eval_device": fin["eval_device"],
        "heldout_loss": f"{h['loss']:.4f}",
        "heldout_ppl": f"{h['ppl']:.2f}",
        "unigram_loss": f"{u['loss']:.4f}",
        "unigram_ppl": f"{u['ppl']:.1f}",
        "ppl_ratio": f"{ratio:.0f}",
        "ppl_target": "met" if ratio >= 20 else "NOT met",
        "slice_targets": f"{s['targets']:,}",
        "slice_loss": f"{s['loss']:.6f}",
        "slice_ppl": f"{s['ppl']:.4f}",
        "slice_unigram_ppl": f"{s['unigram']['ppl']:.1f}",
    }


def breakdown_values(bd: dict) -> dict[str, Any]:
    """How independent the held-out split is (from eval_breakdown.json)."""
    lo, sb = bd["line_overlap"], bd["stdlib_heldout"]
    packages = sorted(lo["per_package"].items(), key=lambda kv: -kv[1]["lines"])
    rows = [
        f"| {pkg} | {o['files']} | {o['lines']:,} | {100 * o['share_in_train']:.1f} % |"
        for pkg, o in packages
    ]
    return {
        "overlap_pct": f"{100 * lo['all_heldout']['share_in_train']:.1f}",
        "package_rows": "\n".join(rows),
        "stdlib_files": sb["files"],
        "stdlib_targets": f"{sb['model']['targets']:,}",
        "stdlib_eval": sb["eval"],
        "stdlib_loss": f"{sb['model']['loss']:.4f}",
        "stdlib_ppl": f"{sb['model']['ppl']:.2f}",
        "stdlib_unigram_ppl": f"{sb['unigram']['ppl']:.1f}",
        "stdlib_ratio": f"{sb['ppl_ratio_unigram_over_model']:.0f}",
    }


def samples_values(samples: list[tuple[str, str]]) -> dict[str, Any]:
    """Each greedy completion as a Python block, prompt and completion together."""
    lines = []
    for prompt, completion in samples:
        lines += ["```python", prompt + completion, "```", f"(prompt: {json.dumps(prompt)})\n"]
    return {"sample_new_tokens": SAMPLE_NEW_TOKENS, "samples": "\n".join(lines)}


_BLOCK = re.compile(r"^<!-- when (\w+) -->\n(.*?)^<!-- end \1 -->\n", re.DOTALL | re.MULTILINE)


def render(template: str, values: dict[str, Any], blocks: dict[str, bool]) -> str:
    """Keep or drop each ``<!-- when NAME -->`` block as ``blocks[NAME]`` says, then fill the
    ``${name}`` fields; a field without a value is an error, not a blank in the card."""

    def block(m: re.Match) -> str:
        return m.group(2) if blocks[m.group(1)] else ""

    return Template(_BLOCK.sub(block, template)).substitute(values)


def card_text(c: CardInputs, samples: list[tuple[str, str]] | None) -> str:
    """The card's Markdown for ``c``; the greedy completions section when ``samples`` is given."""
    values = {
        **files_values(c),
        **corpus_values(c),
        **architecture_values(c),
        **training_values(c),
        **heldout_values(c),
        **(lease_values(c.lease) if c.lease else {}),
        **(breakdown_values(c.breakdown) if c.breakdown else {}),
        **(samples_values(samples) if samples is not None else {}),
    }
    blocks = {
        "not_shipped": c.log["config"]["name"] != "shipped",
        "lease": bool(c.lease),
        "breakdown": bool(c.breakdown),
        "samples": samples is not None,
    }
    template = resources.files("labkit.train").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return render(template, values, blocks)


def write_card(model_dir: Path, samples: bool = True) -> Path:
    """Render MODEL_CARD.md from the folder's JSON files (and greedy samples made now)."""
    model_dir = Path(model_dir)
    text = card_text(CardInputs.read(model_dir), greedy_samples(model_dir) if samples else None)
    return files.atomic_write_text(model_dir / "MODEL_CARD.md", text)
