"""labkit.export.gguf: the file reads back (gguf-py) and llama.cpp computes what torch computes.

Reference points: gguf.GGUFReader and gguf.quants (llama.cpp's own Python package) for the file;
labkit's Llama in float32 for the numbers; ``tokenizers`` for the ids. Tolerances:

* F32 / F16 tensors read back bit-for-bit equal to what we wrote (after the q/k permutation);
  Q8_0 / Q4_0 bytes equal labkit.quant's (themselves byte-exact vs gguf-py, see
  test_quant_crosslib), dequantized within half a quantization step of the original;
* llama.cpp (the xllamacpp wheel, in process) reads and runs what we write for tiny-llama, the
  real model (SmolLM2-135M) and a random model of odd shapes (llama2.c stories260K's): 64
  greedy tokens equal labkit's, and at every one of them llama.cpp's log-probabilities (its API
  returns those, not raw logits) are within GGUF_F32 (1e-3) of labkit's float32 log-softmax
  (F32 KV cache, flash attention off; measured ~5e-5: the two sum in different orders);
* token ids: llama.cpp's tokenizer on the exported vocabulary equals ``tokenizers``, exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit.core import tolerances as tol
from labkit.export.gguf import FILE_TYPES, export_gguf, gguf_name, permute_qk, pre_tokenizer_name
from labkit.models.errors import ModelLoadError
from labkit.models.llama import apply_rope

gguf = pytest.importorskip("gguf")

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "models" / "tiny-llama"
needs_shipped = pytest.mark.skipif(
    not (SHIPPED / "model.safetensors").is_file(), reason="data/models/tiny-llama is not in this checkout"
)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    """A random tied-embedding GQA Llama (2 layers, hidden 64) with the shipped tokenizer."""
    from conftest import random_llama_with_shipped_tokenizer

    return random_llama_with_shipped_tokenizer(tmp_path_factory.mktemp("gguf-small") / "small-llama")


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}


def _rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ...: llama.cpp's LLAMA_ROPE_TYPE_NORM."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # the tables are cat(freqs, freqs): one of each
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2)


def test_permute_qk_turns_rotate_half_into_pairs():
    """RoPE(halves) on W x == unpermute(RoPE(pairs) on permute(W) x), and q.k is unchanged."""
    from labkit.models.llama import rope_cos_sin

    torch.manual_seed(0)
    n_head, d, hidden, t = 3, 8, 16, 5
    w = torch.randn(n_head * d, hidden)
    x = torch.randn(t, hidden)
    cos, sin = rope_cos_sin(d, t, 10000.0)
    q_hf = apply_rope((x @ w.T).view(t, n_head, d).transpose(0, 1), cos, sin)  # [H, T, d]
    wp = torch.from_numpy(permute_qk(w.numpy(), n_head))
    q_gg = _rope_pairs((x @ wp.T).view(t, n_head, d).transpose(0, 1), cos, sin)
    # pairs layout -> halves layout: channel 2i -> i, 2i+1 -> d/2 + i
    back = torch.cat((q_gg[..., 0::2], q_gg[..., 1::2]), dim=-1)
    assert torch.allclose(back, q_hf, atol=tol.SAME_MATH.at("cpu"))
    # q.k reaches ~300 here (unnormalised x and W): 1e-4 is float32 rounding of sums that size
    assert torch.allclose(q_gg @ q_gg.transpose(1, 2), q_hf @ q_hf.transpose(1, 2), atol=1e-4)


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_written_file_reads_back(small_folder, tmp_path, file_type):
    from gguf.quants import dequantize

    from labkit.quant.gguf_blocks import quantize

    path = export_gguf(small_folder, tmp_path / f"small-{file_type}.gguf", file_type)
    reader = gguf.GGUFReader(path)
    cfg = json.loads((small_folder / "config.json").read_text())

    def field(key):
        f = reader.fields[key]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode()
        return f.parts[f.data[0]][0]

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2
    assert field("llama.embedding_length") == 64
    assert field("llama.attention.head_count") == 4
    assert field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 16
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"
    # the id the tokenizer prepends (the shipped tokenizer's <|bos|> = 0), not transformers'
    # default in this random config (1): llama.cpp must add what tokenizers adds
    assert field("tokenizer.ggml.bos_token_id") == 0 != cfg["bos_token_id"]
    assert field("tokenizer.ggml.add_bos_token")
    assert field("tokenizer.ggml.eos_token_id") == cfg["eos_token_id"]
    tok = json.loads((small_folder / "tokenizer.json").read_text())
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 8192
    assert len(reader.fields["tokenizer.ggml.merges"].data) == len(tok["model"]["merges"])

    weights = _weights(small_folder)
    assert "lm_head.weight" not in weights  # tied: no output.weight in the file either
    expected = {gguf_name(k): k for k in weights}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    for name, t in tensors.items():
        w = weights[expected[name]]
        if expected[name].endswith("q_proj.weight"):
            w = permute_qk(w, 4)
        elif expected[name].endswith("k_proj.weight"):
            w = permute_qk(w, 2)
        assert list(t.shape) == list(reversed(w.shape)), name  # ggml lists dims innermost first
        want_type = "F32" if w.ndim == 1 else file_type
        assert t.tensor_type.name == want_type, name
        got = dequantize(t.data, t.tensor_type).reshape(w.shape)
        if want_type == "F32":
            np.testing.assert_array_equal(got, w)
        elif want_type == "F16":
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape[0], -1), quantize(w, want_type))
            step = np.abs(w).max() / (127 if want_type == "Q8_0" else 7)
            assert np.abs(got - w).max() <= step, name


def test_bad_inputs_name_the_problem(small_folder, tmp_path):
    with pytest.raises(ValueError, match="file_type"):
        export_gguf(small_folder, tmp_path / "x.gguf", "Q5_K")
    with pytest.raises(ModelLoadError, match="config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "F32")
    assert not list(tmp_path.glob("*.gguf*"))  # no partial file left behind
    with pytest.raises(ValueError, match="no GGUF name"):
        gguf_name("model.layers.0.self_attn.rotary_emb.weight")


TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "import os\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []  # ünïcode, tabs\t!",
    "x = {'a': [1, 2.5e-3], \"b\": None}\r\n\n\n    # trailing spaces   ",
    "12345 apples cost 3.14159 dollars, ½ of them ⅔ ripe; ١٢٣",
]
N_GREEDY = 64  # greedy tokens compared, llama.cpp against labkit


def _labkit_greedy(folder: Path, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """labkit's greedy tokens after ``prompt`` (float32, its KV cache) and the log-softmax rows
    they were chosen from [N_GREEDY, vocab]."""
    from labkit.inference.generate import greedy
    from labkit.models import load
    from labkit.runtimes.base import log_softmax

    model = load(folder, device="cpu", dtype="float32").model
    with torch.no_grad():
        out = greedy(model, torch.tensor([prompt]), N_GREEDY, return_logits=True)
    return [int(t) for t in out.new_tokens[0]], log_softmax(out.logits[0].numpy())


def _check_llamacpp_runs_export(folder: Path, prompt: list[int], texts: list[str], *,
                                parse_special: bool = False, logprob_steps: int = N_GREEDY,
                                streamed: bool = True) -> float:
    """Export ``folder`` to F32 and run it in llama.cpp: its token ids for ``texts`` equal
    labkit's tokenizer's; step by step, its greedy tokens equal labkit's and its log-probabilities
    are within GGUF_F32 of labkit's at each of the first ``logprob_steps`` positions (a full
    vocabulary of JSON per step: SmolLM2's 49152 take seconds each); ``streamed``: one streamed
    request's 64 greedy ids equal labkit's too (a text whose tokens all end on whole UTF-8
    characters: llama.cpp names no id for a token that does not). Returns the max |d log p|."""
    from labkit import runtimes
    from labkit.core.tolerances import GGUF_F32
    from labkit.models import load

    tokenizer = load(folder, device="cpu", dtype="float32").tokenizer
    want_tokens, want = _labkit_greedy(folder, prompt)
    with runtimes.get("llama.cpp-f32", threads=1) as rt:
        rt.load(folder)
        for text in texts:
            assert rt.tokenize(text, parse_special=parse_special) == tokenizer(text)["input_ids"], text
        steps = rt.timed_generate(prompt, logprob_steps, keep_logits=True)
        stream = rt.timed_generate(prompt, N_GREEDY) if streamed else None
    assert steps.tokens == want_tokens[:logprob_steps]
    if stream is not None:  # llama.cpp's own loop; it never samples EOS (ignore_eos), so:
        assert tokenizer.eos_token_id not in want_tokens, "pick a prompt that runs 64 tokens"
        assert stream.tokens == want_tokens
    err = float(np.abs(np.stack(steps.logits) - want[:logprob_steps]).max())
    assert err <= float(GGUF_F32), f"llama.cpp F32 vs labkit fp32: max |d log p| = {err:.2e}"
    return err


@pytest.fixture(autouse=True)
def _runtime_cache(tmp_path, monkeypatch):
    """The adapters' GGUF cache in a temporary folder (never build/cache)."""
    monkeypatch.setenv("LABKIT_RUNTIME_CACHE", str(tmp_path / "cache"))


@needs_shipped
def test_llamacpp_runs_tiny_llama_export():
    from labkit.models import load

    prompt = load(SHIPPED, device="cpu", dtype="float32").tokenizer(TEXTS[0])["input_ids"]
    _check_llamacpp_runs_export(SHIPPED, prompt, TEXTS)


@pytest.mark.slow
def test_llamacpp_runs_smollm2_export():
    """The real model (SmolLM2-135M, ChatML): its tokenizer's specials parsed in text, no BOS
    added (its post-processor adds none), head_dim 64 of 9 heads; 64 greedy tokens of a chat,
    log-probabilities over the whole vocabulary at the first 8."""
    from labkit.models import embedded, load

    folder = embedded.folder()
    loaded = load(folder, device="cpu", dtype="float32")
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prose = "The river Seine flows through Paris, and along its banks"  # 64 tokens, no end of turn
    _check_llamacpp_runs_export(folder, loaded.tokenizer(prose)["input_ids"], [chat, prose, *TEXTS],
                                parse_special=True, logprob_steps=8)


def _stories260k_shape(out: Path) -> Path:
    """A random labkit Llama of llama2.c stories260K's shape (hidden 64, MLP 172, 8 query and
    4 KV heads of 8 dims, 5 layers, vocab 512) with a 512-token byte-level BPE trained on
    labkit's own source; weights drawn wide (std 0.2) so greedy choices are not near-ties."""
    from safetensors.torch import save_file

    from labkit.models.config import LlamaConfig
    from labkit.models.llama import Llama
    from labkit.train import tokenizer as tok_mod

    sources = sorted((Path(__file__).resolve().parents[1] / "labkit").rglob("*.py"))
    tok = tok_mod.train_tokenizer((p.read_text() for p in sources), vocab_size=512)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=tok_mod.BOS_ID,
                      eos_token_id=tok_mod.EOS_ID)
    torch.manual_seed(260)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.2)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    tok_mod.save(tok, out, model_max_length=512)
    return out


def test_llamacpp_runs_odd_shapes(tmp_path):
    """Shapes that are not powers of two or multiples of 32 (MLP 172: no whole Q8_0 block),
    head_dim 8, GQA 2:1, untied output: llama.cpp reads and runs them as labkit does."""
    folder = _stories260k_shape(tmp_path / "stories260k-shape")
    from labkit.models import load

    prompt = load(folder, device="cpu", dtype="float32").tokenizer(TEXTS[0])["input_ids"]
    _check_llamacpp_runs_export(folder, prompt, TEXTS, streamed=False)  # random bytes: no ids
    q8 = gguf.GGUFReader(export_gguf(folder, tmp_path / "odd-Q8_0.gguf", "Q8_0"))
    types = {t.name: t.tensor_type.name for t in q8.tensors}
    assert types["blk.0.ffn_down.weight"] == "F16"  # 172 inputs: stored F16, as llama-quantize does
    assert types["blk.0.ffn_up.weight"] == "Q8_0"


def test_pre_tokenizer_names():
    where = Path("tokenizer.json")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level, where) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}, where) == "smollm"
    for other in ({"type": "Metaspace"}, {**byte_level, "add_prefix_space": True},
                  {"type": "Sequence", "pretokenizers": [byte_level, digits]}, None):
        with pytest.raises(ValueError, match="no llama.cpp equivalent"):
            pre_tokenizer_name(other, where)


def test_smollm_pre_tokenizer_splits_as_tokenizers_does(small_folder, tmp_path):
    """A tokenizer.json with Digits(individual_digits) before ByteLevel, tagged ``smollm``:
    llama.cpp's ids equal ``tokenizers``' on digits, fractions and other number characters."""
    from labkit import runtimes

    folder = tmp_path / "digits"
    shutil.copytree(small_folder, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, tok["pre_tokenizer"]]}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with runtimes.get("llama.cpp-f32", threads=1) as rt:
        rt.load(folder)
        for text in TEXTS:
            assert rt.tokenize(text) == ref.encode(text).ids, text
