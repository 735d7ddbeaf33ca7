"""OpenVINO adapters: labkit's Llama converted to an OpenVINO model, f32 and weight-compressed.

Why plain ``openvino`` and not ``optimum-intel``: optimum-intel 2.2.0 (the current release)
requires ``transformers<5.6`` and ``huggingface-hub<1.22``, while the lab's environment has
transformers 5.24; installing it would downgrade the lab's transformers. Converting our own
module also keeps the math identical to the parity reference (the same RMSNorm, RoPE tables and
GQA as ``labkit.models.llama``), so a logit difference is OpenVINO's, not a second model's.

How: :class:`KVStep` is the labkit Llama written as a pure function
``(input_ids, position_ids, past_k, past_v) -> (last logits, present_k, present_v)`` with the K/V
of all layers stacked ``[layers, 1, kv_heads, positions, head_dim]``. ``openvino.convert_model``
traces it (dynamic token and position counts); then OpenVINO's make-stateful transformation turns
the past/present pair into internal state (ReadValue/Assign), as optimum-intel does for its LLMs,
so the cache stays inside the runtime between calls instead of being copied in and out.

The CPU plugin would run in bf16 on CPUs with AVX512-BF16/AMX unless told otherwise; the f32 row
sets ``INFERENCE_PRECISION_HINT=f32`` so its parity column measures conversion, not bf16.
Weight compression (``openvino-int8``, ``openvino-int4``) is ``nncf.compress_weights`` on the
converted model (weights only; activations stay f32).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from labkit.runtimes.base import Runtime

#: nncf modes per adapter: (mode name, group size or None); int4 keeps nncf's default of
#: int8 for the embedding/output matrix (``all_layers=False``)
COMPRESSION: dict[str, tuple[str, int | None]] = {
    "int8": ("INT8_ASYM", None),
    "int4": ("INT4_SYM", 64),
}


def _kv_step_module(model: Any) -> Any:
    """A torch module computing one prefill/decode call of ``model`` on explicit stacked K/V."""
    import torch
    from torch import nn

    from labkit.inference.export_cache import PastKVCache
    from labkit.models.layers import explicit_gqa

    class KVStep(nn.Module):
        """(input_ids [1,T], position_ids [1,T], past_k/v [L,1,Hkv,S,d]) -> logits, present K/V."""

        def __init__(self, llama: Any) -> None:
            super().__init__()
            self.llama = llama

        def forward(self, input_ids, position_ids, past_k, past_v):  # noqa: ANN001
            pos = position_ids[0]
            keys_at = torch.arange(past_k.shape[3] + input_ids.shape[1])
            mask = keys_at[None, :] <= pos[:, None]  # [T, S]: query i sees keys <= its position
            cache = PastKVCache(past_k.unbind(0), past_v.unbind(0), pos, mask)
            with explicit_gqa():  # exporters know repeat, not enable_gqa
                logits = self.llama(input_ids, cache=cache, last_only=True)[:, -1]  # [1, vocab]
            return logits, torch.stack(cache.present_k), torch.stack(cache.present_v)

    return KVStep(model).eval()


def convert(model: Any) -> Any:
    """``openvino.Model`` of labkit Llama ``model`` (float32) with the K/V cache as state."""
    import openvino as ov
    import torch
    from openvino._offline_transformations import apply_make_stateful_transformation

    cfg = model.config
    step = _kv_step_module(model)
    kv_shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 3, cfg.head_dim)
    example = (
        torch.zeros(1, 2, dtype=torch.long),
        torch.tensor([[3, 4]]),
        torch.zeros(kv_shape),
        torch.zeros(kv_shape),
    )
    kv_dyn = [cfg.num_hidden_layers, 1, cfg.num_key_value_heads, -1, cfg.head_dim]
    with torch.no_grad():
        ov_model = ov.convert_model(
            step,
            example_input=example,
            input=[
                ("input_ids", [1, -1], ov.Type.i64),
                ("position_ids", [1, -1], ov.Type.i64),
                ("past_k", kv_dyn, ov.Type.f32),
                ("past_v", kv_dyn, ov.Type.f32),
            ],
        )
    for out, name in zip(ov_model.outputs, ("logits", "present_k", "present_v"), strict=True):
        out.get_tensor().set_names({name})
    apply_make_stateful_transformation(ov_model, {"past_k": "present_k", "past_v": "present_v"})
    return ov_model


def compress(ov_model: Any, scheme: str) -> Any:
    """The weights of ``ov_model`` compressed by nncf (``scheme`` in :data:`COMPRESSION`)."""
    if scheme not in COMPRESSION:
        raise ValueError(f"compress: scheme must be one of {sorted(COMPRESSION)}, got {scheme!r}")
    import nncf

    mode, group = COMPRESSION[scheme]
    kwargs: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, mode)}
    if group is not None:
        kwargs.update(group_size=group, ratio=1.0)
    return nncf.compress_weights(ov_model, **kwargs)


def constant_bytes(ov_model: Any) -> int:
    """Bytes of all Constant nodes of ``ov_model``: its weights as OpenVINO stores them."""
    return int(sum(op.get_byte_size() for op in ov_model.get_ops() if op.get_type_name() == "Constant"))


class OpenVINO(Runtime):
    """labkit Llama converted with ``openvino.convert_model``, run by the CPU plugin in f32."""

    name: ClassVar[str] = "openvino"
    #: None (f32 weights) or a key of COMPRESSION
    compression: ClassVar[str | None] = None

    def __init__(self, threads: int | None = None, precision: str = "f32") -> None:
        self.threads = threads
        self.precision = precision
        self.dtype = "float32" if self.compression is None else f"{self.compression} weights"
        self.note = f"OpenVINO CPU plugin, inference precision {precision}"

    @classmethod
    def available(cls) -> str | None:
        if importlib.util.find_spec("openvino") is None:
            return "openvino not installed (pip install openvino)"
        if cls.compression and importlib.util.find_spec("nncf") is None:
            return "nncf not installed (pip install nncf) for OpenVINO weight compression"
        return None

    def load(self, model_dir: Path) -> None:
        import openvino as ov

        from labkit.models import load

        self._check_available()
        loaded = load(Path(model_dir), device="cpu", dtype="float32")
        ov_model = convert(loaded.model)
        if self.compression is not None:
            ov_model = compress(ov_model, self.compression)
        self._bytes = constant_bytes(ov_model)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        self.compiled = ov.Core().compile_model(ov_model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.length = 0

    def _run(self, ids: list[int]) -> np.ndarray:
        positions = np.arange(self.length, self.length + len(ids), dtype=np.int64)[None]
        self.request.infer({"input_ids": np.asarray([ids], dtype=np.int64), "position_ids": positions})
        self.length += len(ids)
        return np.array(self.request.get_tensor("logits").data[0], dtype=np.float32)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.request.reset_state()
        self.length = 0
        return self._run(list(ids))

    def decode_step(self, token: int) -> np.ndarray:
        return self._run([int(token)])

    def model_bytes(self) -> int | None:
        return self._bytes

    def close(self) -> None:
        self.request = self.compiled = None


class OpenVINOInt8(OpenVINO):
    """OpenVINO with int8 (asymmetric, per-channel) weights from ``nncf.compress_weights``."""

    name: ClassVar[str] = "openvino-int8"
    compression: ClassVar[str | None] = "int8"


class OpenVINOInt4(OpenVINO):
    """OpenVINO with int4 (symmetric, groups of 64) weights; embedding/output stay int8 (nncf)."""

    name: ClassVar[str] = "openvino-int4"
    compression: ClassVar[str | None] = "int4"
