"""labkit.train: corpus manifest, tokenizer, training loop, and the shipped tiny-llama folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from labkit.core import paths
from labkit.core import tolerances as tol
from labkit.train import configs, corpus, loop, tokenizer

SHIPPED = paths.repo_models_dir() / "tiny-llama"


# --- corpus ----------------------------------------------------------------------------------


def _fake_tree(root: Path) -> list[corpus.SourceFile]:
    files = {
        "pkg/a.py": "def a():\n    return 1\n",
        "pkg/b.py": "def b():\n    return 2\n",
        "pkg/copy_of_a.py": "def a():\n    return 1\n",  # identical to a.py: kept once
        "pkg/empty.py": "\n",
        "pkg/tests/test_a.py": "assert True\n",
        "pkg/sub/test_b.py": "assert True\n",
        "pkg/conftest.py": "x = 1\n",
    }
    files.update({f"pkg/m{i:03d}.py": f"VALUE_{i} = {i}\n" for i in range(200)})
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if not corpus._is_excluded(rel.parts):
            out.append(corpus.SourceFile(f"fake/{rel.as_posix()}", "fake", p))
    return out


def test_manifest_is_deterministic_deduped_and_split_by_whole_files(tmp_path):
    files = _fake_tree(tmp_path)
    m1, texts = corpus.build_manifest(files)
    m2, _ = corpus.build_manifest(list(reversed(files)))
    paths_kept = [e["path"] for e in m1["files"]]
    assert "fake/pkg/tests/test_a.py" not in paths_kept
    assert "fake/pkg/sub/test_b.py" not in paths_kept
    assert "fake/pkg/conftest.py" not in paths_kept
    assert m1["dropped"] == {"duplicate": 1, "empty": 1, "too_large": 0, "not_utf8": 0}
    assert "fake/pkg/copy_of_a.py" not in paths_kept  # a.py sorts first and is kept
    # same files in another order: the same manifest (build_manifest sorts nothing itself,
    # collect() does, so sort here as collect does)
    m3, _ = corpus.build_manifest(sorted(files, key=lambda f: f.path))
    assert m3["manifest_hash"] == m1["manifest_hash"]
    assert m2["manifest_hash"] != "" and len(m1["manifest_hash"]) == 64
    # each file is in exactly one split, decided by its path alone, and its text is whole
    for e in m1["files"]:
        assert e["split"] == corpus.split_of(e["path"])
        assert e["bytes"] == len(texts[e["path"]].encode())
    train = corpus.documents(m1, texts, "train")
    held = corpus.documents(m1, texts, "heldout")
    assert len(train) + len(held) == len(m1["files"])
    assert set(train).isdisjoint(held)
    assert held, "200 files at 2.5 % should hold at least one held-out file"


def test_split_rate_is_about_two_and_a_half_percent():
    share = np.mean([corpus.split_of(f"x/{i}.py") == "heldout" for i in range(20000)])
    assert 0.02 < share < 0.03


def test_collect_excludes_tests_from_the_stdlib():
    files = list(corpus.stdlib_files())
    assert files, "the running interpreter's stdlib should have .py files"
    assert not [f for f in files if "/test/" in f.path or "/idlelib/" in f.path]
    assert any(f.path == "stdlib/json/decoder.py" for f in files)


# --- tokenizer -------------------------------------------------------------------------------

ODD_SOURCE = (
    "# -*- coding: utf-8 -*-\r\n"
    "def f(x):\n\tif x:\n\t\treturn 'héllo → wörld ✓ 🐍'\n"
    "    \n  # trailing spaces   \n\n\n"
    's = """\\x00 bytes\\n"""\n'
)


def test_trained_tokenizer_round_trips_python_source_exactly():
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text(encoding="utf-8") for n in ("textwrap.py", "bisect.py")]
    tok = tokenizer.train_tokenizer(texts, vocab_size=400)
    assert tok.get_vocab_size() == 400
    assert [tok.token_to_id(t) for t in tokenizer.SPECIAL_TOKENS] == [0, 1, 2]
    for text in [(stdlib / "heapq.py").read_text(encoding="utf-8"), ODD_SOURCE]:
        ids = tok.encode(text).ids
        assert ids[0] == tokenizer.BOS_ID  # the post-processor prepends <|bos|>
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.encode(text, add_special_tokens=False).ids == ids[1:]


# --- training loop ---------------------------------------------------------------------------


def _tiny(**kw) -> configs.TrainConfig:
    return configs.get("tiny", **{"max_steps": 12, "eval_every": 6, **kw})


def _synthetic_streams(vocab: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Documents of a repeated pattern: learnable, so loss must fall within a few steps."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(120):
        start = int(rng.integers(3, vocab - 8))
        body = [start + (i % 7) for i in range(int(rng.integers(20, 40)))]
        docs.append([tokenizer.BOS_ID, *body, tokenizer.EOS_ID])
    stream = np.array([t for d in docs for t in d], dtype=np.uint16)
    cut = int(len(stream) * 0.9)
    return stream[:cut], stream[cut:]


def test_training_reduces_loss_and_is_deterministic_for_a_seed():
    train, held = _synthetic_streams()
    a = loop.train(
        _tiny(), train, held, vocab_size=64, device="cpu", progress=False, say=lambda s: None
    )
    b = loop.train(
        _tiny(), train, held, vocab_size=64, device="cpu", progress=False, say=lambda s: None
    )
    assert a.losses == b.losses  # bit-identical on CPU
    assert np.mean(a.losses[-3:]) < np.mean(a.losses[:3]) - 0.5
    evals = [e["heldout_loss"] for e in a.log["evals"]]
    assert a.log["best"]["heldout_loss"] == min(evals)
    c = loop.train(
        _tiny(seed=7), train, held, vocab_size=64, device="cpu", progress=False, say=lambda s: None
    )
    assert c.losses != a.losses


def test_best_checkpoint_is_chosen_by_heldout_loss(monkeypatch):
    """Fake held-out losses that are best in the middle: the middle weights must come back."""
    train, held = _synthetic_streams()
    fake = iter([5.0, 3.0, 4.0])  # evals at steps 0, 6, 12
    snapshots = {}
    real_evaluate = loop.evaluate

    def fake_evaluate(model, *a, **k):
        real_evaluate(model, *a, **k)
        loss = next(fake)
        snapshots[loss] = {n: p.detach().clone() for n, p in model.state_dict().items()}
        return {"loss": loss, "ppl": math.exp(loss), "targets": 1}

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    res = loop.train(
        _tiny(), train, held, vocab_size=64, device="cpu", progress=False, say=lambda s: None
    )
    assert res.log["best"]["step"] == 6
    for name, value in res.model.state_dict().items():
        assert np.array_equal(value.numpy(), snapshots[3.0][name].numpy()), name


def test_unigram_baseline_matches_hand_computation():
    import torch

    train = np.array([0, 5, 5, 5, 6, 1], dtype=np.uint16)  # BOS is not counted
    targets = torch.tensor([[5, 6, loop.IGNORE]])
    res = loop.unigram_baseline(train, targets, vocab_size=8)
    # counts without BOS: 5 total; p(5) = (3+1)/(5+8), p(6) = (1+1)/(5+8)
    expected = -(math.log(4 / 13) + math.log(2 / 13)) / 2
    assert res["targets"] == 2
    assert res["loss"] == pytest.approx(expected, rel=1e-12)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = configs.get("tiny", max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert loop.lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert loop.lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert loop.lr_at(100, 100, cfg) == pytest.approx(0.1)
    lrs = [loop.lr_at(s, 100, cfg) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:], strict=False))


def test_written_folder_loads_in_transformers_with_the_same_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    train, held = _synthetic_streams()
    cfg = _tiny(max_steps=2)
    res = loop.train(
        cfg, train, held, vocab_size=64, device="cpu", progress=False, say=lambda s: None
    )
    stored = loop.storage_roundtrip(res.model)
    tok_dir = tmp_path / "tok"
    tokenizer.save(tokenizer.train_tokenizer(["def f(): pass\n"] * 3, vocab_size=300), tok_dir, 64)
    out = loop.write_model_folder(
        tmp_path / "m", loop.llama_config(cfg, 64), stored, tok_dir, {"note": "test"}
    )
    assert not list(tmp_path.glob(".m.*"))  # no temp folder left behind
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.from_numpy(held[: cfg.seq_len].astype(np.int64))[None]
    res.model.eval()
    with torch.no_grad():
        same = tol.SAME_MATH.at("cpu")  # transformers and labkit on the same CPU kernels
        torch.testing.assert_close(hf(x).logits, res.model(x), rtol=0, atol=same)


# --- the shipped folder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_log() -> dict:
    if not (SHIPPED / "training_log.json").is_file():
        pytest.fail(f"{SHIPPED}: the shipped model folder is missing")
    return json.loads((SHIPPED / "training_log.json").read_text())


def test_shipped_folder_meets_the_spec(shipped_log):
    cfg = json.loads((SHIPPED / "config.json").read_text())
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "MODEL_CARD.md",
    ):
        assert (SHIPPED / name).is_file(), name
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["max_position_embeddings"] >= 512
    head = cfg["head_dim"]
    for d in (
        cfg["vocab_size"],
        cfg["hidden_size"],
        cfg["intermediate_size"],
        head,
        cfg["num_attention_heads"] * head,
        cfg["num_key_value_heads"] * head,
    ):
        assert d % 64 == 0, d
    assert 10e6 <= shipped_log["num_parameters"] <= 40e6
    assert (SHIPPED / "model.safetensors").stat().st_size <= 100e6
    fin = shipped_log["final"]
    assert fin["heldout"]["ppl"] * 20 <= fin["unigram"]["ppl"]
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert shipped_log["corpus"]["manifest_hash"] in card
    assert f"{fin['heldout']['ppl']:.2f}" in card


def test_shipped_model_recomputes_the_card_slice_loss_in_transformers(shipped_log):
    """The card's slice loss came from the GPU (fp32, no TF32); CPU fp32 agrees to 1e-4."""
    import torch
    import torch.nn.functional as F
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    win = torch.from_numpy(load_file(str(SHIPPED / "heldout_slice.safetensors"))["windows"]).long()
    x, y = win[:, :-1], win[:, 1:].clone()
    y[y == tokenizer.BOS_ID] = loop.IGNORE
    with torch.no_grad():
        logits = model(x).logits
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=loop.IGNORE).item()
    card = shipped_log["final"]["slice"]
    assert int((y != loop.IGNORE).sum()) == card["targets"]
    assert loss == pytest.approx(card["loss"], rel=1e-4)
    assert f"{card['loss']:.6f}" in (SHIPPED / "MODEL_CARD.md").read_text()


def test_shipped_tokenizer_round_trips_and_agrees_with_transformers():
    from transformers import AutoTokenizer

    tok = tokenizer.load(SHIPPED)
    hf = AutoTokenizer.from_pretrained(SHIPPED)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    text = Path(corpus.__file__).read_text() + ODD_SOURCE
    ids = hf(text)["input_ids"]
    assert ids == tok.encode(text).ids
    assert hf.decode(ids, skip_special_tokens=True) == text


# --- the model card ----------------------------------------------------------------------------


def test_card_template_ships_with_the_package():
    from importlib import resources

    from labkit.train import card

    text = resources.files("labkit.train").joinpath(card.TEMPLATE).read_text(encoding="utf-8")
    assert text.startswith("# ${name}")


def test_render_keeps_or_drops_blocks_and_refuses_missing_fields():
    from labkit.train import card

    template = "a ${x}\n<!-- when extra -->\nb ${y}\n<!-- end extra -->\nc\n"
    assert card.render(template, {"x": 1, "y": 2}, {"extra": True}) == "a 1\nb 2\nc\n"
    assert card.render(template, {"x": 1}, {"extra": False}) == "a 1\nc\n"
    with pytest.raises(KeyError, match="y"):
        card.render(template, {"x": 1}, {"extra": True})


def _without_samples(text: str) -> str:
    head, rest = text.split("## Greedy completions\n", 1)
    return head + "## Use\n" + rest.split("## Use\n", 1)[1]


def test_card_of_the_shipped_folder_is_the_shipped_card(tmp_path):
    """The card rebuilt from the shipped folder's files equals the committed MODEL_CARD.md
    (greedy samples left out: they are regenerated by transformers and checked by hand)."""
    import shutil

    from labkit.train import card

    folder = tmp_path / "tiny-llama"
    shutil.copytree(SHIPPED, folder)
    out = card.write_card(folder, samples=False)
    assert out.read_text() == _without_samples((SHIPPED / "MODEL_CARD.md").read_text())


def test_card_sections_follow_the_folder():
    """No lease or breakdown file: no such rows or section; a demonstration config says so;
    samples come out as Python blocks with their prompt."""
    from labkit.train import card

    inputs = card.CardInputs.read(SHIPPED)
    log = json.loads(json.dumps(inputs.log))
    log["config"]["name"] = "quick"
    bare = card.CardInputs(**{**inputs.__dict__, "log": log, "lease": None, "breakdown": None})
    text = card.card_text(bare, samples=[("def f():", "\n    return 1")])
    assert "Trained with the 'quick' configuration" in text
    assert "device_lease.json |" not in text and "Device time" not in text
    assert "eval_breakdown.json |" not in text and "How independent" not in text
    assert '```python\ndef f():\n    return 1\n```\n(prompt: "def f():")\n\n## Use' in text
    assert "${" not in text and "<!--" not in text


def test_line_overlap_counts_heldout_lines_seen_in_train():
    from labkit.train import card

    shared = "x = compute_something_long(argument)"
    texts = {
        "a.py": f"{shared}\nshort\n",
        "b.py": f"{shared}\nonly_in_heldout_file_b = 1234567\n",
        "c.py": "another_line_only_in_heldout = 42\n",
    }
    manifest = {
        "files": [
            {"path": "a.py", "split": "train", "package": "p"},
            {"path": "b.py", "split": "heldout", "package": "p"},
            {"path": "c.py", "split": "heldout", "package": "q"},
        ]
    }
    out = card.line_overlap(manifest, lambda e: texts[e["path"]])
    assert out["per_package"]["p"] == {
        "files": 1, "lines": 2, "lines_in_train": 1, "share_in_train": 0.5
    }
    assert out["per_package"]["q"]["lines_in_train"] == 0
    assert out["all_heldout"] == {"lines": 3, "lines_in_train": 1, "share_in_train": 1 / 3}


def test_training_folder_writes_are_atomic(tmp_path, monkeypatch):
    """split_parts and assemble round-trip the weights; no temporary is left behind."""
    import hashlib

    from labkit.train import cli

    src = tmp_path / "m"
    src.mkdir()
    blob = bytes(range(256)) * 10
    (src / "model.safetensors").write_bytes(blob)
    (src / "training_log.json").write_text(
        json.dumps({"model_safetensors_sha256": hashlib.sha256(blob).hexdigest()})
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(cli, "PART_BYTES", 1000)
    cli.split_parts(src, tmp_path / "parts")
    assert len(list((tmp_path / "parts").glob("model.safetensors.part*"))) == 3
    out = cli.assemble(tmp_path / "parts", tmp_path, tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == blob
    assert json.loads((out / "generation_config.json").read_text()) == loop.generation_config()
    assert not list(tmp_path.rglob("*.tmp"))
