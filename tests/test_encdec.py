"""labkit.studies.encoder_vs_decoder: attention weights vs transformers' eager attention, the perturbation test on a
causal and a bidirectional model, retrieval accuracy, the prefix measurements, and the toy
seq2seq task's layouts, ceilings, parameter counts and determinism.

Tolerances: attention weights and outputs in float32 agree within 1e-5 (two orders of
summation); "unchanged" hidden states in the perturbation test within 1e-6 relative.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit.inference.generate import greedy
from labkit.models import load
from labkit.studies import encoder_vs_decoder as encdec

ATOL = 1e-5


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def llama_folder(hf_checkpoint) -> Path:
    return hf_checkpoint("llama", num_key_value_heads=2, num_attention_heads=4)


@pytest.fixture
def tiny_bert():
    """A random 2-layer BERT and a word-level BERT tokenizer, shaped like LoadedModel."""
    import transformers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()

    class Loaded:
        pass

    loaded = Loaded()
    loaded.model, loaded.tokenizer = model, tok
    return loaded


# --- the sentence set ---------------------------------------------------------------------------


def test_shipped_sentences_are_5_topics_of_6():
    texts, topics = encdec.load_sentences()
    assert len(texts) == 30 and len(set(texts)) == 30
    assert sorted(topics.count(t) for t in set(topics)) == [6] * 5


def test_load_sentences_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        encdec.load_sentences(tmp_path / "missing.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tsentence\na\tb\n")
    with pytest.raises(ValueError, match="bad.tsv"):
        encdec.load_sentences(bad)


# --- attention weights --------------------------------------------------------------------------


def test_llama_attentions_match_transformers_eager(llama_folder):
    ours = load(llama_folder).model
    ref = load(llama_folder, impl="hf").model
    ref.set_attn_implementation("eager")
    ids = torch.randint(3, 128, (1, 11), generator=torch.Generator().manual_seed(1))
    weights = encdec.llama_attentions(ours, ids)
    with torch.no_grad():
        expected = torch.stack([a[0] for a in ref(ids, output_attentions=True).attentions])
    assert weights.shape == expected.shape == (2, 4, 11, 11)
    torch.testing.assert_close(weights, expected.float(), atol=ATOL, rtol=0)
    assert encdec.mass_above_diagonal(weights) == 0.0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 11), atol=ATOL, rtol=0)


def test_recomputed_llama_attention_reproduces_layer_outputs(llama_folder):
    model = load(llama_folder).model
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    assert encdec.llama_attention_output_error(model, ids) < ATOL


def test_llama_attentions_needs_one_sequence(llama_folder):
    model = load(llama_folder).model
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        encdec.llama_attentions(model, torch.zeros(2, 4, dtype=torch.long))


def test_bert_attentions_are_bidirectional_and_restore_sdpa(tiny_bert):
    before = tiny_bert.model.config._attn_implementation
    tokens, weights = encdec.bert_attentions(tiny_bert, "w1 w2 w3 w4")
    assert tokens == ["[CLS]", "w1", "w2", "w3", "w4", "[SEP]"]
    assert weights.shape == (2, 4, 6, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6), atol=ATOL, rtol=0)
    assert encdec.mass_above_diagonal(weights) > 0.1
    assert tiny_bert.model.config._attn_implementation == before


# --- perturbation test --------------------------------------------------------------------------


def test_perturbation_causal_decoder_never_changes_earlier_positions(llama_folder):
    model = load(llama_folder).model
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    positions = list(range(1, 10))
    m = encdec.perturbation_matrix(encdec.llama_hidden_fn(model), ids, positions, replacement=5)
    assert m.shape == (9, 10)
    assert encdec.leak_before(m, positions) <= 1e-6
    assert min(m[r, i:].min() for r, i in enumerate(positions)) > 1e-3


def test_perturbation_bidirectional_encoder_changes_everywhere(tiny_bert):
    ids = tiny_bert.tokenizer("w1 w2 w3 w4 w5", return_tensors="pt")["input_ids"]
    positions = list(range(1, ids.shape[1] - 1))
    m = encdec.perturbation_matrix(encdec.bert_hidden_fn(tiny_bert.model), ids, positions,
                                   replacement=tiny_bert.tokenizer.mask_token_id)
    assert encdec.leak_before(m, positions) > 1e-3
    assert encdec.change_elsewhere_min(m, positions) > 1e-3


def test_perturbation_replaces_with_another_token_when_equal():
    seen = []

    def hidden(ids):
        seen.append(ids.clone())
        return ids.float().unsqueeze(-1) + 1.0

    ids = torch.tensor([[4, 7, 9]])
    m = encdec.perturbation_matrix(hidden, ids, [1], replacement=7)
    assert seen[1].tolist() == [[4, 8, 9]]  # 7 is already there: 7 + 1 is used
    np.testing.assert_allclose(m, [[0.0, 1 / 8, 0.0]])
    with pytest.raises(ValueError, match="positions"):
        encdec.perturbation_matrix(hidden, ids, [3], replacement=1)


# --- retrieval ----------------------------------------------------------------------------------


def test_retrieval_accuracy_leave_one_out():
    labels = ["a", "a", "b", "b"]
    sim = np.array([[1.0, 0.9, 0.1, 0.0],
                    [0.9, 1.0, 0.0, 0.95],   # nearest other of item 1 is item 3 (wrong topic)
                    [0.1, 0.0, 1.0, 0.8],
                    [0.0, 0.95, 0.8, 1.0]])  # nearest other of item 3 is item 1 (wrong topic)
    assert encdec.retrieval_accuracy(sim, labels) == 0.5
    assert encdec.chance_retrieval_accuracy(labels) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="similarity"):
        encdec.retrieval_accuracy(sim[:3, :3], labels)


def test_bag_of_words_similarity():
    v = encdec.bag_of_words_embeddings(["the cat sat", "The cat sat.", "dogs run fast"])
    sim = encdec.similarity_matrix(v)
    assert sim[0, 1] == pytest.approx(1.0)
    assert sim[0, 2] == pytest.approx(0.0)


def test_decoder_embeddings_unit_rows_and_bos_excluded(llama_folder):
    loaded = load(llama_folder)
    texts = ["w1 w2 w3", "w4 w5"]
    for pooling in ("mean", "last"):
        v = encdec.decoder_embeddings(loaded.model, loaded.tokenizer, texts, pooling)
        assert v.shape == (2, 64)
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(2), atol=ATOL, rtol=0)
    # "last" pooling of a sentence equals the normed final state at its last token
    ids = loaded.tokenizer(texts[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        state = loaded.model.model.norm(loaded.model(ids, return_hidden=True)[1][-1])[0, -1]
    last = encdec.decoder_embeddings(loaded.model, loaded.tokenizer, texts[1:], "last")[0]
    torch.testing.assert_close(last, state / state.norm(), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="pooling"):
        encdec.decoder_embeddings(loaded.model, loaded.tokenizer, texts, "max")


# --- prompt as context --------------------------------------------------------------------------


def test_kl_divergence_known_values():
    p = torch.log(torch.tensor([0.5, 0.5]))
    q = torch.log(torch.tensor([0.9, 0.1]))
    assert encdec.kl_divergence(p, p) == 0.0
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert encdec.kl_divergence(p, q) == pytest.approx(expected, rel=1e-6)


def test_prefix_shift_and_token_class(llama_folder):
    loaded = load(llama_folder)
    tok = loaded.tokenizer
    body = tok("w1 w2", return_tensors="pt")["input_ids"]
    same = encdec.prefix_shift(loaded.model, body, body)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and not same["top_changed"]
    assert same["top_overlap"] == 5
    prefixed = tok("w9 w8 w7 w1 w2", return_tensors="pt")["input_ids"]
    assert encdec.prefix_shift(loaded.model, body, prefixed)["kl"] > 0
    ids = encdec.token_class(tok, exact=["w1", "w2"])
    assert ids == tok.convert_tokens_to_ids(["w1", "w2"])
    logp = encdec.next_token_logprobs(loaded.model, body)
    assert encdec.token_prob(logp, ids) == pytest.approx(float(logp[ids].exp().sum()))
    with pytest.raises(ValueError, match="no token"):
        encdec.token_class(tok, exact=["not-a-token"])


def test_time_decode_generates_the_greedy_tokens(llama_folder):
    model = load(llama_folder).model
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    timing, tokens = encdec.time_decode(model, ids, 5)
    assert tokens.tolist() == greedy(model, ids, 5).new_tokens.tolist()
    assert timing.n_tokens == 5 and len(timing.tpot_s) == 4


# --- the seq2seq toy task -----------------------------------------------------------------------


def test_task_layouts_and_output_positions():
    task = encdec.Seq2SeqTask(max_len=4)
    src = torch.tensor([[10, 11, 12]])
    tgt = task.target(src)
    assert tgt.tolist() == [[12, 11, 10]]
    prefix = encdec.prefix_layout(task, src, tgt)
    assert prefix.tolist() == [[1, 10, 11, 12, 3, 12, 11, 10, 2]]
    assert prefix[0, encdec.output_positions("prefix", 3)].tolist() == [12, 11, 10, 2]
    inter = encdec.interleaved_layout(task, src, tgt)
    assert inter.tolist() == [[1, task.length_token(3), 10, 12, 11, 11, 12, 10, 2]]
    assert inter[0, encdec.output_positions("interleaved", 3)].tolist() == [12, 11, 10, 2]
    sort = encdec.Seq2SeqTask(kind="sort", max_len=4)
    assert sort.target(torch.tensor([[12, 10, 11]])).tolist() == [[10, 11, 12]]
    assert task.first_symbol == 8 and task.vocab_size == 18


def test_task_refuses_bad_parameters():
    with pytest.raises(ValueError, match="kind"):
        encdec.Seq2SeqTask(kind="copy")
    with pytest.raises(ValueError, match="min_len"):
        encdec.Seq2SeqTask(min_len=5, max_len=3)


def test_interleaved_ceiling():
    assert encdec.interleaved_ceiling(1, 10) == 1.0
    assert encdec.interleaved_ceiling(2, 10) == pytest.approx((1 + 0.1) / 2)  # y1 = x2 unseen
    assert encdec.interleaved_ceiling(8, 10) == pytest.approx((4 + 0.4) / 8)


def test_used_parameters_are_those_that_get_gradients():
    task = encdec.Seq2SeqTask(max_len=3)
    size = encdec.ModelSize(d_model=16, heads=2, ffn=32, decoder_only_layers=2)
    src, tgt = task.batch(4, 3, torch.Generator().manual_seed(0))
    for arch in encdec.ARCHS:
        model = encdec.build(arch, task, size, seed=0)
        if arch == encdec.ARCHS[0]:
            loss = encdec._loss_encdec(model, task, src, tgt)
        else:
            layout = "prefix" if arch == encdec.ARCHS[1] else "interleaved"
            loss = encdec._loss_decoder(model, task, layout, src, tgt)
        loss.backward()
        with_grad = sum(p.numel() for p in model.parameters() if p.grad is not None)
        assert encdec.used_parameters(model) == with_grad, arch


def test_training_is_deterministic_and_evaluation_shapes():
    task = encdec.Seq2SeqTask(max_len=3)
    size = encdec.ModelSize(d_model=16, heads=2, ffn=32, encoder_layers=1, decoder_layers=1,
                            decoder_only_layers=2)
    for arch in encdec.ARCHS:
        m1, l1 = encdec.train_seq2seq(arch, task, size, steps=3, batch_size=8, warmup=1, seed=7)
        _, l2 = encdec.train_seq2seq(arch, task, size, steps=3, batch_size=8, warmup=1, seed=7)
        assert l1 == l2, arch
        rows = encdec.evaluate(arch, m1, task, [2, 3], n=5)
        assert [r["length"] for r in rows] == [2, 3]
        assert all(0.0 <= r["seq_acc"] <= r["token_acc"] <= 1.0 for r in rows)
        pred = encdec.predict(arch, m1, task, task.batch(5, 3, torch.Generator().manual_seed(0))[0])
        assert pred.shape == (5, 3)


def test_predict_scores_a_perfect_reverser_as_perfect():
    """evaluate() must give 1.0 to a model that reverses: a fake encoder-decoder whose logits put
    all mass on the right next token, given what it has been fed."""
    from types import SimpleNamespace

    task = encdec.Seq2SeqTask(max_len=4)

    class Reverser(torch.nn.Module):
        def get_encoder(self):
            return lambda input_ids: SimpleNamespace(last_hidden_state=input_ids[:, :-1])

        def forward(self, encoder_outputs, decoder_input_ids):
            src = encoder_outputs[0]
            step = decoder_input_ids.shape[1] - 1
            nxt = src.flip(1)[:, step] if step < src.shape[1] else torch.full_like(src[:, 0], 2)
            logits = torch.full((src.shape[0], decoder_input_ids.shape[1], task.vocab_size), -1e9)
            logits[torch.arange(src.shape[0]), -1, nxt] = 0.0
            return SimpleNamespace(logits=logits)

    rows = encdec.evaluate(encdec.ARCHS[0], Reverser(), task, [2, 4], n=16)
    assert [r["seq_acc"] for r in rows] == [1.0, 1.0]
