"""Model configurations, field for field as in a Hugging Face ``config.json``.

Keeping the HF names means a folder written by ``transformers`` reads straight into these classes
and ``to_hf_dict()`` writes a ``config.json`` that ``transformers`` reads back: one checkpoint,
two implementations, no renaming.

Older config files keep ``rope_theta`` (and Phi's ``partial_rotary_factor``) at the top level;
transformers >= 5 nests them in ``rope_parameters``. ``from_dict`` reads both; ``to_hf_dict``
writes both, so old and new transformers versions agree on the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.models.errors import ModelLoadError

LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")
PHI_ARCHS = ("PhiForCausalLM",)
BERT_ARCHS = ("BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification")
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "phi": "phi", "bert": "bert"}
SUPPORTED = LLAMA_ARCHS + PHI_ARCHS + BERT_ARCHS

#: Keys without which the shapes of the weights are unknown.
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

#: rope_scaling types our RoPE implements ("linear": positions divided by ``factor``).
_SUPPORTED_ROPE_TYPES = ("default", "linear")


def _require(d: dict[str, Any], source: str) -> None:
    for key in _REQUIRED:
        if key not in d or d[key] is None:
            raise ModelLoadError(source, f"config has no required key {key!r}")


def _positive_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(
            source, f"config key {key!r} must be a positive integer, got {value!r}"
        )
    return value


def _positive_float(value: Any, key: str, source: str) -> float:
    """A finite number > 0 (an int is fine: ``rope_theta: 10000``), else ModelLoadError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ModelLoadError(
            source, f"config key {key!r} must be a finite number > 0, got {value!r}"
        )
    return float(value)


def _optional_token_id(value: Any, key: str, source: str) -> None:
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if i is not None and (isinstance(i, bool) or not isinstance(i, int) or i < 0):
            raise ModelLoadError(
                source, f"config key {key!r} must be a token id (an integer >= 0), a list of "
                f"them or null, got {value!r}"
            )


def _bool(value: Any, key: str, source: str) -> None:
    if not isinstance(value, bool):
        raise ModelLoadError(source, f"config key {key!r} must be true or false, got {value!r}")


def _rope_params(d: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings from either the new ``rope_parameters`` or the old top-level keys."""
    nested = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    merged: dict[str, Any] = {}
    merged.update(scaling)
    merged.update(nested)
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in merged and d.get(key) is not None:
            merged[key] = d[key]
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    merged["rope_type"] = rope_type
    return merged


def _check_both_places(d: dict[str, Any], rope: dict[str, Any], key: str, source: str) -> None:
    """A key written at the top level and in ``rope_parameters`` (as to_hf_dict writes it, for
    old and new transformers) must agree: both readers take the nested one, so an edit of the
    top-level value alone would be silently ignored."""
    top = d.get(key)
    if top is None or top == rope.get(key):
        return
    _positive_float(top, key, source)
    raise ModelLoadError(
        source, f"config keys {key!r} ({top!r}) and 'rope_parameters.{key}' "
        f"({rope.get(key)!r}) disagree; the nested one is what transformers and labkit read",
    )


def _check_rope(rope: dict[str, Any], source: str) -> None:
    if rope["rope_type"] not in _SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            source,
            f"rope type {rope['rope_type']!r} is not supported by labkit's implementation "
            f"(supported: {', '.join(_SUPPORTED_ROPE_TYPES)}); load with impl='hf' instead",
        )


@dataclass
class _DecoderConfig:
    """Fields shared by our decoder configs; see LlamaConfig and PhiConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    head_dim: int | None = None
    torch_dtype: str = "float32"
    rope_scaling: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        self._validate("<config>")

    def _validate(self, source: str) -> None:
        for key in _REQUIRED + ("max_position_embeddings",):
            _positive_int(getattr(self, key), key, source)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive_int(self.num_key_value_heads, "num_key_value_heads", source)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                source,
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})",
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ModelLoadError(
                    source,
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}) and no head_dim is given",
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive_int(self.head_dim, "head_dim", source)
        _positive_float(self.rope_theta, "rope_theta", source)
        _bool(self.tie_word_embeddings, "tie_word_embeddings", source)
        _optional_token_id(self.bos_token_id, "bos_token_id", source)
        _optional_token_id(self.eos_token_id, "eos_token_id", source)
        if self.rope_scaling is not None:
            rope = _rope_params({"rope_scaling": self.rope_scaling})
            _check_rope(rope, source)
            if rope["rope_type"] == "linear":
                _positive_float(rope.get("factor", 1.0), "rope_scaling.factor", source)

    @property
    def rope_scaling_factor(self) -> float:
        """Divide positions by this factor ("linear" scaling); 1.0 without scaling."""
        if not self.rope_scaling:
            return 1.0
        rope = _rope_params({"rope_scaling": self.rope_scaling})
        return float(rope.get("factor", 1.0)) if rope["rope_type"] == "linear" else 1.0

    @classmethod
    def _fields_from_dict(cls, d: dict[str, Any], source: str) -> dict[str, Any]:
        if not isinstance(d, dict):
            raise ModelLoadError(source, f"config must be a JSON object, got {type(d).__name__}")
        _require(d, source)
        rope = _rope_params(d)
        _check_rope(rope, source)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = _positive_float(rope["rope_theta"], "rope_theta", source)
        _check_both_places(d, rope, "rope_theta", source)
        if rope["rope_type"] != "default":
            kwargs["rope_scaling"] = {
                "rope_type": rope["rope_type"],
                "factor": rope.get("factor", 1.0),
            }
        else:
            kwargs.pop("rope_scaling", None)
        dtype = d.get("torch_dtype") or d.get("dtype")
        if isinstance(dtype, str):
            kwargs["torch_dtype"] = dtype
        return kwargs

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>"):
        """Build from a parsed ``config.json``; errors name ``source`` and the offending key."""
        kwargs = cls._fields_from_dict(d, source)
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name in kwargs:
                value = kwargs[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            setattr(obj, f.name, value)
        obj._validate(source)
        return obj

    def _hf_common(self) -> dict[str, Any]:
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters.update(self.rope_scaling)
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
            "dtype": self.torch_dtype,
            "use_cache": True,
            "initializer_range": 0.02,
        }


@dataclass
class LlamaConfig(_DecoderConfig):
    """A Llama (also Mistral-style without sliding window) decoder: RMSNorm, RoPE, GQA, SwiGLU."""

    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False

    def _validate(self, source: str) -> None:
        super()._validate(source)
        _positive_float(self.rms_norm_eps, "rms_norm_eps", source)
        _bool(self.attention_bias, "attention_bias", source)
        _bool(self.mlp_bias, "mlp_bias", source)
        if self.hidden_act != "silu":
            raise ModelLoadError(
                source, f"hidden_act {self.hidden_act!r} is not supported (Llama uses 'silu')"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that transformers' LlamaForCausalLM reads."""
        d = self._hf_common()
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            attention_dropout=0.0,
            pretraining_tp=1,
        )
        return d


@dataclass
class PhiConfig(_DecoderConfig):
    """A Phi-1/1.5/2 decoder: parallel block, partial rotary, LayerNorm, gelu_new, biases."""

    layer_norm_eps: float = 1e-5
    partial_rotary_factor: float = 0.5
    hidden_act: str = "gelu_new"
    qk_layernorm: bool = False

    def _validate(self, source: str) -> None:
        super()._validate(source)
        _positive_float(self.layer_norm_eps, "layer_norm_eps", source)
        if self.hidden_act != "gelu_new":
            raise ModelLoadError(
                source, f"hidden_act {self.hidden_act!r} is not supported (Phi uses 'gelu_new')"
            )
        if self.qk_layernorm:
            raise ModelLoadError(source, "qk_layernorm=True is not supported by labkit's Phi")
        if self.tie_word_embeddings:
            raise ModelLoadError(
                source,
                "tie_word_embeddings=True is not supported by labkit's Phi (lm_head has a bias)",
            )
        _positive_float(self.partial_rotary_factor, "partial_rotary_factor", source)
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ModelLoadError(
                source,
                f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}",
            )

    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head RoPE rotates (as transformers computes it)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def _fields_from_dict(cls, d: dict[str, Any], source: str) -> dict[str, Any]:
        kwargs = super()._fields_from_dict(d, source)
        rope = _rope_params(d)
        if "partial_rotary_factor" in rope:
            kwargs["partial_rotary_factor"] = _positive_float(
                rope["partial_rotary_factor"], "partial_rotary_factor", source
            )
        _check_both_places(d, rope, "partial_rotary_factor", source)
        return kwargs

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that transformers' PhiForCausalLM reads."""
        d = self._hf_common()
        d["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
        d.update(
            architectures=["PhiForCausalLM"],
            model_type="phi",
            layer_norm_eps=self.layer_norm_eps,
            partial_rotary_factor=self.partial_rotary_factor,
            hidden_act=self.hidden_act,
            qk_layernorm=self.qk_layernorm,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
        return d


# --- reading a config.json: the one parser every layer uses ------------------------------------


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder (or the file itself), errors naming the file.

    Only JSON and "is an object" are checked here; :func:`parse_config` checks every field the
    lab reads. Loaders, exporters, the planner and the Swift fixtures all read configs here.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "config.json"
    if not path.is_file():
        raise ModelLoadError(path, "missing config.json: not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(path, "config must be a JSON object")
    return config


def architecture_of(config: dict[str, Any], source: Path | str) -> tuple[str, str]:
    """(family, architecture name): family is "llama", "phi" or "bert"."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise ModelLoadError(source, f"config key 'architectures' must be a list, got {archs!r}")
    for arch in archs:
        if arch in LLAMA_ARCHS:
            return "llama", arch
        if arch in PHI_ARCHS:
            return "phi", arch
        if arch in BERT_ARCHS:
            return "bert", arch
    model_type = config.get("model_type")
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type], str(model_type)
    found = ", ".join(map(str, archs)) if archs else "none listed"
    raise ModelLoadError(
        source,
        f"unsupported architecture {found} (model_type {model_type!r}); supported: "
        f"{', '.join(SUPPORTED)}",
    )


def parse_config(config: dict[str, Any], source: str | os.PathLike[str] = "<dict>"):
    """The typed, validated config (LlamaConfig or PhiConfig) of a decoder's ``config.json``.

    Every field the lab reads is checked (type, range, heads dividing the hidden size, KV heads
    dividing the heads) and an error names ``source``, the key, the value and what was expected,
    before any weight is read. BERT configs are refused: labkit runs BERT through transformers.
    """
    family, _ = architecture_of(config, source)
    if family == "llama":
        return LlamaConfig.from_dict(config, source=str(source))
    if family == "phi":
        return PhiConfig.from_dict(config, source=str(source))
    raise ModelLoadError(source, "a BERT config: labkit has no BERT implementation of its own")


def load_config(path: str | os.PathLike[str]):
    """``parse_config(read_config(path))``: a model folder's typed config, in one call."""
    config = read_config(path)
    file = Path(path) if Path(path).suffix else Path(path) / "config.json"
    return parse_config(config, file)
