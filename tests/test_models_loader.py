"""labkit.models.load: every way a model is named, both implementations, and every bad input
giving a ModelLoadError that names the file and the problem. Checkpoints are tiny random models
written by transformers into tmp_path; nothing touches the network (HF_HUB_OFFLINE=1 here)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from labkit.core import tolerances as tol
from labkit.models import LoadedModel, ModelLoadError, load
from labkit.models.llama import Llama
from labkit.models.phi import Phi


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _ids(vocab: int = 128, t: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(0))


def _logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = loaded.model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


# --- what loads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("llama", 1), ("phi", 4)])
def test_local_folder_labkit_matches_hf_impl(hf_checkpoint, arch, kv_heads):
    folder = hf_checkpoint(arch, num_key_value_heads=kv_heads)
    ours = load(folder, device="cpu")
    ref = load(str(folder), device="cpu", impl="hf")
    assert isinstance(ours.model, Llama if arch == "llama" else Phi)
    assert ours.card["impl"] == "labkit" and ref.card["impl"] == "hf"
    assert ours.card["architecture"] == (
        "LlamaForCausalLM" if arch == "llama" else "PhiForCausalLM"
    )
    assert ours.card["num_parameters"] == ref.card["num_parameters"]
    assert ours.card["source"] == "local folder" and ours.card["dtype"] == "float32"
    assert ours.card["config"]["num_key_value_heads"] == kv_heads
    ids = _ids()
    assert (_logits(ours, ids) - _logits(ref, ids)).abs().max().item() <= tol.SAME_MATH.at("cpu")
    assert ours.tokenizer("w1 w2")["input_ids"] == [4, 5]
    assert not ours.model.training


def test_mistral_style_folder_loads_as_llama(hf_checkpoint):
    folder = hf_checkpoint("mistral", sliding_window=None)
    ours, ref = load(folder, device="cpu"), load(folder, device="cpu", impl="hf")
    assert isinstance(ours.model, Llama) and ours.card["architecture"] == "MistralForCausalLM"
    ids = _ids()
    assert (_logits(ours, ids) - _logits(ref, ids)).abs().max().item() <= tol.SAME_MATH.at("cpu")


def test_sharded_checkpoint_loads(hf_checkpoint, tmp_path):
    import transformers

    src = hf_checkpoint("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    ours, ref = load(sharded, device="cpu"), load(src, device="cpu")
    ids = _ids()
    assert torch.equal(_logits(ours, ids), _logits(ref, ids))


def test_half_precision_checkpoint_is_upcast_or_kept(hf_checkpoint, tmp_path):
    import transformers

    src = hf_checkpoint("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    half = tmp_path / "half"
    model.to(torch.bfloat16).save_pretrained(half)
    shutil.copy(src / "tokenizer.json", half / "tokenizer.json")
    up = load(half, device="cpu")
    assert up.model.model.embed_tokens.weight.dtype == torch.float32
    kept = load(half, device="cpu", dtype="bf16")
    assert kept.card["dtype"] == "bfloat16"
    assert kept.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = _ids()
    ref = load(half, device="cpu", impl="hf")  # transformers, upcast to fp32 the same way
    assert (_logits(up, ids) - _logits(ref, ids)).abs().max().item() <= tol.SAME_MATH.at("cpu")


def test_tiny_llama_name_resolves_to_the_repo_folder(hf_checkpoint, tmp_path, monkeypatch):
    from labkit.core import paths

    models = tmp_path / "models"
    monkeypatch.setattr(paths, "repo_models_dir", lambda: models)
    with pytest.raises(ModelLoadError, match="tiny-llama.*missing folder"):
        load("tiny-llama", device="cpu")
    shutil.copytree(hf_checkpoint("llama"), models / "tiny-llama")
    loaded = load("tiny-llama", device="cpu")
    assert loaded.card["name"] == "tiny-llama" and loaded.card["source"] == "repo"


def test_hub_id_is_read_from_the_local_cache(hf_checkpoint, tmp_path, monkeypatch):
    """A hub id present in the HF cache loads offline (snapshot layout written by hand)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(hf_checkpoint("llama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    loaded = load("acme/tiny", device="cpu")
    assert loaded.card["source"] == "hf cache" and loaded.card["name"] == "acme/tiny"


def test_minilm_loads_offline_and_ranks_paraphrases():
    from labkit.models.encoder import cosine, embed

    loaded = load("minilm", device="cpu")
    assert loaded.card["impl"] == "hf" and "no BERT implementation" in loaded.card["note"]
    assert loaded.card["architecture"] == "BertModel" and loaded.card["source"] == "package"
    e = embed(
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby.",
        ],
        loaded,
    )
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=tol.SAME_MATH.at("cpu"))
    similar, unrelated = cosine(e[0], e[1]).item(), cosine(e[0], e[2]).item()
    assert similar > unrelated, (similar, unrelated)


def test_mean_pool_ignores_padding():
    from labkit.models.encoder import mean_pool

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_embedding_does_not_depend_on_batch_padding():
    from labkit.models.encoder import embed

    loaded = load("minilm", device="cpu")
    alone = embed(["A man is eating food."], loaded)
    padded = embed(["A man is eating food.", "a much longer sentence " * 10], loaded)
    assert (alone[0] - padded[0]).abs().max().item() < tol.SAME_MATH.at("cpu")


def test_embedding_rows_follow_input_order_despite_length_sorting():
    from labkit.models.encoder import embed

    loaded = load("minilm", device="cpu")
    texts = ["short.", "a much longer sentence " * 10, "a medium sentence about food.", "x"]
    together = embed(texts, loaded, batch_size=2)
    one_by_one = torch.cat([embed([t], loaded) for t in texts])
    assert (together - one_by_one).abs().max().item() < tol.SAME_MATH.at("cpu")


# --- bad inputs: each names the file and the problem -----------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no-such-model.*missing folder"):
        load(tmp_path / "no-such-model", device="cpu")


def test_config_without_a_required_key(hf_checkpoint):
    folder = hf_checkpoint("llama")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json.*required key 'hidden_size'"):
        load(folder, device="cpu")


def test_unsupported_architecture(hf_checkpoint):
    folder = hf_checkpoint("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load(folder, device="cpu")
    msg = str(err.value)
    assert "config.json" in msg and "GPT2LMHeadModel" in msg
    assert "LlamaForCausalLM" in msg and "PhiForCausalLM" in msg  # lists what is supported


def test_truncated_safetensors(hf_checkpoint):
    folder = hf_checkpoint("llama")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*truncated"):
        load(folder, device="cpu")


def test_corrupt_safetensors_header(hf_checkpoint):
    folder = hf_checkpoint("llama")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16  # the JSON header now starts with garbage
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*corrupt safetensors header"):
        load(folder, device="cpu")


def test_tensor_shape_contradicts_config(hf_checkpoint):
    folder = hf_checkpoint("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 192  # the file holds 128-wide MLP weights
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load(folder, device="cpu")
    msg = str(err.value)
    assert "model.safetensors" in msg and "model.layers.0.mlp.gate_proj.weight" in msg
    assert "[128, 64]" in msg and "[192, 64]" in msg  # got vs expected


def test_missing_tokenizer(hf_checkpoint):
    folder = hf_checkpoint("llama", tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*missing tokenizer"):
        load(folder, device="cpu")


def test_unknown_hub_id_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError) as err:
        load("acme/not-downloaded", device="cpu")
    msg = str(err.value)
    assert "acme/not-downloaded" in msg and "not in the local Hugging Face cache" in msg
    assert "huggingface-cli download acme/not-downloaded" in msg and "allow_network=True" in msg
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        load("acme/not-downloaded", device="cpu", allow_network=True)


def test_unknown_bare_name():
    with pytest.raises(ModelLoadError, match=r"gpt-17.*unknown model name.*tiny-llama, smollm2-135m, minilm"):
        load("gpt-17", device="cpu")


class _Payload:
    """Unpickling this creates a file: proof that a loader executed code from a checkpoint."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_pickle_checkpoint_is_refused_without_unpickling(hf_checkpoint, tmp_path):
    folder = hf_checkpoint("llama")
    (folder / "model.safetensors").unlink()
    sentinel = tmp_path / "code-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    for impl in ("labkit", "hf"):
        with pytest.raises(ModelLoadError) as err:
            load(folder, device="cpu", impl=impl)
        msg = str(err.value)
        assert "pytorch_model.bin" in msg and "pickle" in msg and "execute arbitrary code" in msg
    assert not sentinel.exists()


def test_bad_impl_and_dtype_name_the_parameter(hf_checkpoint):
    folder = hf_checkpoint("llama")
    with pytest.raises(ValueError, match="impl"):
        load(folder, device="cpu", impl="onnx")
    with pytest.raises(ValueError, match="dtype"):
        load(folder, device="cpu", dtype="int8")
