"""Study 12 (labkit.studies.decode_speed): the ladder's arithmetic, its tokens, the breakdown."""

from __future__ import annotations

import pytest
from conftest import decisive_llama, token_prompt

from labkit.studies import decode_speed as ds

NAMES = [n for n, _ in ds.RUNGS]


def _round(threads: int, scale: float, load: float = 0.5) -> dict:
    rates = {n: scale * (10.0 + 5 * i) for i, n in enumerate(NAMES)}
    return {"threads": threads, "rates": rates, "tokens": {n: [1, 2, 3] for n in NAMES},
            "load_avg_1m": load}


def test_ladder_table_takes_gains_within_a_process() -> None:
    rounds = [_round(1, 1.0), _round(1, 0.5, load=3.0), _round(1, 1.0)]
    table = ds.ladder_table(rounds, bytes_per_token=1e8, read_gbs={1: 10.0})
    first, last = table.iloc[0], table.iloc[-1]
    assert first.gain_vs_readable == 1.0 and first.gain_vs_previous == 1.0
    assert last.gain_vs_readable == pytest.approx(30.0 / 10.0)  # the same in every process
    assert last.tok_s == 30.0 and (last["min"], last["max"]) == (15.0, 30.0)
    assert last.bandwidth_fraction == pytest.approx(30.0 / 100.0)  # limit 10 GB/s / 100 MB
    assert last.load_max == 3.0 and last.processes == 3
    assert ds.same_tokens(rounds)
    rounds[1]["tokens"][NAMES[2]] = [1, 2, 4]
    assert not ds.same_tokens(rounds)


def test_every_rung_decodes_the_readable_tokens() -> None:
    model = decisive_llama()
    prompt = token_prompt(5)
    outs = {name: run(prompt, 24).tolist() for name, run in ds._decoders(model).items()}
    assert all(o == outs[NAMES[0]] for o in outs.values())


def test_breakdown_accounts_for_the_wall_time_and_names_families() -> None:
    model = decisive_llama()
    parts = ds.breakdown(model, {"fuse": True}, token_prompt(5), steps=4)
    assert parts["matrix products"] > 0 and parts["Python and dispatch"] >= 0
    assert ds._family("aten::addmm") == "matrix products"
    assert ds._family("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert ds._family("aten::whatever") == "other operators"


def test_gpu_table_keeps_each_machines_latest_run_and_the_ladder_order() -> None:
    import pandas as pd

    def row(run: str, decoder: str, dtype: str, value: float, device: str = "cuda") -> dict:
        return {"device": device, "machine": "m", "run_id": run, "value": value,
                "params": {"gpu": "G", "decoder": decoder, "dtype": dtype}}

    df = pd.DataFrame([row("r1", "b", "float16", 1.0), row("r2", "b", "float16", 2.0),
                       row("r2", "a", "float16", 3.0), row("r2", "a", "bfloat16", 4.0),
                       row("r3", "a", "float16", 9.0, device="cpu")])
    table = ds.gpu_table(df)
    assert list(table.index.get_level_values("decoder")) == ["b", "a"]
    assert table.loc[("G", "r2", "b"), "float16"] == 2.0  # r1 is an older run: left out
    assert table.loc[("G", "r2", "a"), "bfloat16"] == 4.0
    assert ds.gpu_table(df[df.device == "cpu"]).empty and ds.host_7b_table(pd.DataFrame()).empty


TINY_SHAPE = dict(vocab_size=9000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_theta=10000.0, rms_norm_eps=1e-5)


def test_random_folder_is_a_model_folder_every_loader_reads(tmp_path) -> None:
    """The host-7B folder at a tiny size: labkit's loader reads it back at the stored dtype,
    with the seeded weights, and transformers computes the same logits (the HF interchange)."""
    import torch
    import transformers

    from labkit.models import load

    folder = ds.write_random_folder(TINY_SHAPE, tmp_path / "random", dtype="float16", label="tiny")
    again = ds.random_model(TINY_SHAPE, "float32", "cpu")
    loaded = load(str(folder), device="cpu", dtype="float32").model
    for name, value in again.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[0, 5, 8999, 17]])
    with torch.no_grad():
        assert (hf(ids).logits - loaded(ids)).abs().max() < 1e-4
    assert ds.llama2_7b_shape()["hidden_size"] == 4096 and ds.llama2_7b_shape()["vocab_size"] == 32000


def test_host_7b_record_states_the_bandwidth_fraction(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LABKIT_OUTPUT_ROOT", str(tmp_path))
    rec = ds.host_7b_record("swift", "float32", 2.0, [1.9, 2.0, 2.1], 16, 27e9, 100.0,
                             prompt_len=1, gen_len=16)
    assert rec["model"] == ds.HOST_7B_MODEL and rec["threads"] == 16
    assert rec["params"]["bandwidth_fraction"] == pytest.approx(0.54)  # 2 tok/s x 27 GB / 100 GB/s
    assert rec["params"]["processes"] == [1.9, 2.0, 2.1]
