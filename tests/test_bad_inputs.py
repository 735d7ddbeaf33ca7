"""Bad inputs: each one a clear error that names the culprit, and nothing left half-written.

One parametrized table (CASES) across loading, config, generation, results, figures, export, the
CLI and notebook parameters. Every case builds what it needs in a temporary lab (LABKIT_ROOT),
snapshots that whole folder, makes the bad call, and asserts the exception type, that the
message names the culprit (every string in ``names``), and that no file or folder changed.

Case ids starting with a probe row (A25, B08, ... P02) are the rows of the bad-input probe of
2026-12-01, which found them weak; ``new-`` cases are what a user hits that the probe did not
try. One probe row is not an error by design: B19 (``tokenizer.decode([99999])`` gives "") is
the tokenizers library's documented behaviour for its own call; labkit's own decode calls
(``inference.chat``) refuse such an id, which case B19-chat checks.

Nothing here runs a notebook kernel or reads the network: models are tiny random checkpoints,
notebook parameters are checked from the notebooks' sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from labkit.core import results
from labkit.models import ModelLoadError

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"

#: Every row of the probe's table of weak cases; each must be a case id prefix below.
PROBE_ROWS = ("A25", "A26", "A27", "A37", "A53", "B08", "B09", "B10", "B17", "B19", "C13",
              "C26", "D04", "D06", "D09", "D11", "D15", "E07", "E08", "E10", "G02", "G07",
              "G08", "H02", "H03", "H08", "H09", "H10", "D16", "F05", "F10", "P01", "P02")


@dataclass
class Ctx:
    """What a case sees: the temporary lab root, the shared tiny checkpoint, a monkeypatch."""

    root: Path
    checkpoint: Path
    mp: pytest.MonkeyPatch
    model_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    id: str
    act: Callable[[Ctx], Any]
    exc: type[BaseException]
    names: tuple[str, ...]
    setup: Callable[[Ctx], None] | None = None


class Refused(Exception):
    """A command that exited non-zero, or a run that ended "failed": its exit code and output."""


# --------------------------------------------------------------------------- builders


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from conftest import build_hf_checkpoint

    return build_hf_checkpoint(tmp_path_factory.mktemp("bad-inputs") / "tiny")


_MODELS: dict[str, Any] = {}


def tiny() -> Any:
    """labkit's tiny random Llama (vocab 96, context 256), built once."""
    if "llama" not in _MODELS:
        from conftest import random_llama

        _MODELS["llama"] = random_llama(0)
    return _MODELS["llama"]


def ids(*values: int) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.long)


def model_copy(config: dict | None = None, drop: tuple[str, ...] = (),
               edit: Callable[[Path], None] | None = None) -> Callable[[Ctx], None]:
    """Setup: the tiny checkpoint copied into the lab as ``model/``, config.json edited."""

    def setup(ctx: Ctx) -> None:
        ctx.model_dir = ctx.root / "model"
        shutil.copytree(ctx.checkpoint, ctx.model_dir)
        if config or drop:
            path = ctx.model_dir / "config.json"
            cfg = json.loads(path.read_text())
            cfg.update(config or {})
            for key in drop:
                cfg.pop(key, None)
            path.write_text(json.dumps(cfg))
        if edit is not None:
            edit(ctx.model_dir)

    return setup


def write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        target = folder / name
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            target.write_text(data)

    return edit


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def garbage_header(folder: Path) -> None:
    body = b"{1: 2}"
    (folder / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)


def edit_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        change(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    return edit


def _transpose_down(state: dict) -> None:
    key = "model.layers.0.mlp.down_proj.weight"
    state[key] = state[key].t().contiguous()


def _drop_tensor(state: dict) -> None:
    del state["model.layers.1.mlp.up_proj.weight"]


def _extra_tensor(state: dict) -> None:
    state["model.layers.0.surprise.weight"] = torch.zeros(2)


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")


def _index_only(index: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(index)

    return edit


def load_model(impl: str = "labkit", **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.models import load

        return load(ctx.model_dir, device="cpu", impl=impl, **kw)

    return act


def load_name(name: Any, **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.models import load

        return load(name, device=kw.pop("device", "cpu"), **kw)

    return act


def parse(config: dict, arch: str = "llama") -> Callable[[Ctx], Any]:
    """Act: parse_config of TINY_SHAPE + ``config`` (no weights needed)."""

    def act(ctx: Ctx) -> Any:
        from conftest import TINY_SHAPE

        from labkit.models.config import parse_config

        archs = {"llama": "LlamaForCausalLM", "phi": "PhiForCausalLM"}[arch]
        return parse_config({"architectures": [archs], **TINY_SHAPE, **config}, "cfg/config.json")

    return act


def config_case(id: str, change: dict, *names: str, drop: tuple[str, ...] = ()) -> Case:
    return Case(id, load_model(), ModelLoadError, ("config.json", *names),
                setup=model_copy(change, drop))


def folder_case(id: str, edit: Callable[[Path], None], *names: str, impl: str = "labkit",
                exc: type[BaseException] = ModelLoadError) -> Case:
    return Case(id, load_model(impl), exc, names, setup=model_copy(edit=edit))


# --------------------------------------------------------------------------- 1. loading, config

LOADING = [
    config_case("A25-rms_norm_eps-string", {"rms_norm_eps": "1e-5"}, "rms_norm_eps", "'1e-5'"),
    config_case("A26-rope_theta-negative", {"rope_theta": -10000}, "rope_theta", "-10000"),
    config_case("A27-rope_theta-nan", {"rope_theta": math.nan}, "rope_theta", "nan"),
    config_case("new-rope_theta-top-and-nested-disagree", {"rope_theta": 20000.0}, "rope_theta",
                "20000.0", "disagree"),
    config_case("new-nested-rope_theta-zero",
                {"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta"),
    config_case("new-rope-type-unsupported",
                {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "'yarn'"),
    config_case("new-rope-linear-factor-zero",
                {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 0}},
                "factor"),
    config_case("new-vocab_size-zero", {"vocab_size": 0}, "vocab_size", "0"),
    config_case("new-vocab_size-string", {"vocab_size": "128"}, "vocab_size", "'128'"),
    config_case("new-vocab_size-float", {"vocab_size": 128.5}, "vocab_size", "128.5"),
    config_case("new-vocab_size-bool", {"vocab_size": True}, "vocab_size", "True"),
    config_case("new-hidden_size-negative", {"hidden_size": -64}, "hidden_size", "-64"),
    config_case("new-num_hidden_layers-zero", {"num_hidden_layers": 0}, "num_hidden_layers"),
    config_case("new-heads-do-not-divide-hidden", {"num_attention_heads": 6}, "hidden_size",
                "num_attention_heads", drop=("head_dim",)),
    config_case("new-kv-heads-do-not-divide-heads", {"num_key_value_heads": 3},
                "num_key_value_heads", "num_attention_heads"),
    config_case("new-kv-heads-zero", {"num_key_value_heads": 0}, "num_key_value_heads"),
    config_case("new-max_position_embeddings-negative", {"max_position_embeddings": -1},
                "max_position_embeddings"),
    config_case("new-head_dim-zero", {"head_dim": 0}, "head_dim"),
    config_case("new-intermediate_size-missing", {}, "intermediate_size",
                drop=("intermediate_size",)),
    config_case("new-hidden_size-null", {"hidden_size": None}, "hidden_size"),
    config_case("new-rms_norm_eps-zero", {"rms_norm_eps": 0}, "rms_norm_eps"),
    config_case("new-rms_norm_eps-negative", {"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    config_case("new-tie_word_embeddings-string", {"tie_word_embeddings": "false"},
                "tie_word_embeddings", "'false'"),
    config_case("new-attention_bias-int", {"attention_bias": 1}, "attention_bias"),
    config_case("new-mlp_bias-string", {"mlp_bias": "no"}, "mlp_bias"),
    config_case("new-bos_token_id-negative", {"bos_token_id": -1}, "bos_token_id", "-1"),
    config_case("new-eos_token_id-string", {"eos_token_id": "</s>"}, "eos_token_id", "'</s>'"),
    config_case("new-eos_token_id-list-with-string", {"eos_token_id": [2, "x"]}, "eos_token_id"),
    config_case("new-hidden_act-gelu", {"hidden_act": "gelu"}, "hidden_act", "'gelu'"),
    config_case("new-architectures-not-a-list", {"architectures": "LlamaForCausalLM"},
                "architectures"),
    config_case("new-architecture-unsupported", {"architectures": ["GPT2LMHeadModel"]},
                "GPT2LMHeadModel", "supported"),
    Case("new-config-not-json", load_model(), ModelLoadError, ("config.json", "not valid JSON"),
         setup=model_copy(edit=write("config.json", '{"vocab_size": 128,,}'))),
    Case("new-config-a-list", load_model(), ModelLoadError, ("config.json", "JSON object"),
         setup=model_copy(edit=write("config.json", "[1, 2]"))),
    Case("new-config-missing", load_model(), ModelLoadError, ("config.json", "missing"),
         setup=model_copy(edit=remove("config.json"))),
    Case("new-config-not-utf8", load_model(), ModelLoadError, ("config.json", "not valid JSON"),
         setup=model_copy(edit=write("config.json", b'{"vocab_size": "\xff"}'))),
    Case("new-phi-partial_rotary_factor-above-one", parse({"partial_rotary_factor": 1.5}, "phi"),
         ModelLoadError, ("cfg/config.json", "partial_rotary_factor", "1.5")),
    Case("new-phi-layer_norm_eps-string", parse({"layer_norm_eps": "x"}, "phi"), ModelLoadError,
         ("layer_norm_eps", "'x'")),
    Case("new-phi-qk_layernorm", parse({"qk_layernorm": True}, "phi"), ModelLoadError,
         ("qk_layernorm",)),
    Case("new-phi-tied-embeddings", parse({"tie_word_embeddings": True}, "phi"), ModelLoadError,
         ("tie_word_embeddings",)),
    folder_case("A37-tokenizer-empty-object", write("tokenizer.json", "{}"), "tokenizer.json",
                "added_tokens", "empty object"),
    folder_case("new-tokenizer-not-json", write("tokenizer.json", "{oops"), "tokenizer.json",
                "not valid JSON"),
    folder_case("new-tokenizer-a-list", write("tokenizer.json", "[]"), "tokenizer.json", "list"),
    folder_case("new-tokenizer-missing", remove("tokenizer.json"), "tokenizer.json", "missing"),
    folder_case("new-weights-missing", remove("model.safetensors"), "model.safetensors",
                "missing weights"),
    folder_case("new-pickle-only", _pickle_only, "pytorch_model.bin", "pickle"),
    folder_case("new-safetensors-truncated", truncate, "model.safetensors", "truncated"),
    folder_case("new-safetensors-garbage-header", garbage_header, "model.safetensors",
                "corrupt safetensors header"),
    folder_case("new-safetensors-empty-file", write("model.safetensors", b""),
                "model.safetensors", "truncated"),
    folder_case("new-tensor-shape-vs-config", edit_tensors(_transpose_down), "model.safetensors",
                "down_proj", "[128, 64]", "[64, 128]"),
    folder_case("A53-tensor-shape-vs-config-impl-hf", edit_tensors(_transpose_down),
                "model.safetensors", "down_proj", "[128, 64]", "[64, 128]", impl="hf"),
    folder_case("new-tensor-missing", edit_tensors(_drop_tensor), "up_proj", "missing tensor"),
    folder_case("new-tensor-unexpected", edit_tensors(_extra_tensor), "surprise",
                "unexpected tensor"),
    folder_case("new-index-not-json", _index_only("{"), "model.safetensors.index.json",
                "weight_map"),
    folder_case("new-index-missing-shard",
                _index_only('{"weight_map": {"lm_head.weight": "shard-1.safetensors"}}'),
                "shard-1.safetensors", "missing shard"),
    Case("new-unknown-model-name", load_name("tiny-lama"), ModelLoadError,
         ("tiny-lama", "known names", "tiny-llama")),
    Case("new-model-path-is-a-file", lambda c: load_name(c.root / "x.json")(c), ModelLoadError,
         ("x.json", "got a file"), setup=lambda c: (c.root / "x.json").write_text("{}")),
    Case("new-model-folder-missing", load_name("./no/such/folder"), ModelLoadError,
         ("no/such/folder", "missing folder")),
    Case("new-model-name-empty", load_name(""), ModelLoadError, ("''", "model name")),
    Case("new-model-name-none", load_name(None), ModelLoadError, ("None", "model name")),
    Case("new-hub-id-not-cached", load_name("no-such-org/no-such-model"), ModelLoadError,
         ("no-such-org/no-such-model", "local Hugging Face cache")),
    Case("new-impl-unknown", load_model(impl="torch"), ValueError, ("impl", "'torch'"),
         setup=model_copy()),
    Case("new-dtype-int8", load_model(dtype="int8"), ValueError, ("dtype", "'int8'"),
         setup=model_copy()),
    Case("new-device-gpu", lambda c: load_name(c.model_dir, device="gpu")(c), ValueError,
         ("device", "'gpu'"), setup=model_copy()),
]


# --------------------------------------------------------------------------- 2. generation


def greedy(prompt: Any, n: Any = 4, **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.inference.generate import greedy as run

        return run(tiny(), prompt() if callable(prompt) else prompt, n, **kw)

    return act


def sample(prompt: Any, n: Any = 4, **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.inference.generate import sample as run

        return run(tiny(), prompt, n, **kw)

    return act


def stream(prompt: Any, n: Any = 4, **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.inference.generate import stream as run

        return run(tiny(), prompt, n, **kw)  # raises at the call, before any next()

    return act


def fast(prompt: Any, n: Any = 4, **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.inference.fast_decode import FastDecoder

        return FastDecoder(tiny(), **kw).greedy(prompt, n)

    return act


def chat(question: Any = "hi", **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.inference.chat import chat as run

        return run(tiny(), ctx.extra["tokenizer"], question, **kw)

    return act


def with_tokenizer(template: bool = True, generated: int | None = None) -> Callable[[Ctx], None]:
    """Setup: the checkpoint's tokenizer (128 tokens), with a chat template if asked; with
    ``generated``, the generation loop stubbed to produce that id."""

    def setup(ctx: Ctx) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ctx.checkpoint, local_files_only=True)
        if template:
            tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        ctx.extra["tokenizer"] = tok
        if generated is not None:
            ctx.mp.setattr("labkit.inference.chat.stream",
                           lambda *a, **k: iter([torch.tensor([generated])]))

    return setup


def _not_a_llama(ctx: Ctx) -> Any:
    from labkit.inference.fast_decode import FastDecoder

    return FastDecoder(torch.nn.Linear(2, 2))


def _decode_check(ctx: Ctx) -> Any:
    from labkit.inference.generate import check_token_ids

    return check_token_ids([5, 99999], 128, "ids to decode")


LONG = torch.zeros(1, 250, dtype=torch.long)

GENERATION = [
    Case("B08-id-beyond-vocab", greedy(ids(1, 9000)), ValueError,
         ("input_ids", "9000", "vocab_size 96")),
    Case("B09-negative-id", greedy(ids(-1, 2)), ValueError, ("input_ids", "-1", "vocab_size 96")),
    Case("B10-float-ids", greedy(torch.tensor([[3.7, 1.0]])), TypeError,
         ("input_ids", "integer", "float32")),
    Case("new-bool-ids", greedy(torch.tensor([[True, False]])), TypeError, ("input_ids", "bool")),
    Case("new-ids-a-list", greedy([[1, 2, 3]]), TypeError, ("input_ids", "list")),
    Case("new-ids-1d", greedy(torch.tensor([1, 2])), ValueError, ("input_ids", "shape", "(2,)")),
    Case("new-ids-empty-prompt", greedy(torch.zeros(1, 0, dtype=torch.long)), ValueError,
         ("input_ids", "(1, 0)")),
    Case("B17-eos-a-string", greedy(ids(1, 2), eos_token_id="</s>"), TypeError,
         ("eos_token_id", "'</s>'")),
    Case("new-eos-a-float", greedy(ids(1, 2), eos_token_id=2.0), TypeError,
         ("eos_token_id", "2.0")),
    Case("new-eos-a-bool", greedy(ids(1, 2), eos_token_id=True), TypeError,
         ("eos_token_id", "True")),
    Case("new-eos-list-with-none", greedy(ids(1, 2), eos_token_id=[2, None]), TypeError,
         ("eos_token_id", "None")),
    Case("new-eos-beyond-vocab", greedy(ids(1, 2), eos_token_id=500), ValueError,
         ("eos_token_id", "500", "vocab_size 96")),
    Case("new-prompt-plus-new-tokens-beyond-context", greedy(LONG, 10), ValueError,
         ("250", "max_new_tokens 10", "260", "max_position_embeddings 256")),
    Case("new-beyond-context-without-cache", greedy(LONG, 10, cache=False), ValueError,
         ("250", "256")),
    Case("new-max_new_tokens-negative", greedy(ids(1, 2), -1), ValueError, ("max_new_tokens",)),
    Case("new-max_new_tokens-float", greedy(ids(1, 2), 2.5), ValueError,
         ("max_new_tokens", "2.5")),
    Case("new-max_new_tokens-string", greedy(ids(1, 2), "8"), ValueError,
         ("max_new_tokens", "'8'")),
    Case("new-temperature-zero", sample(ids(1, 2), temperature=0.0), ValueError,
         ("temperature", "0.0", "greedy")),
    Case("new-temperature-negative", sample(ids(1, 2), temperature=-1.0), ValueError,
         ("temperature", "-1.0")),
    Case("new-temperature-nan", sample(ids(1, 2), temperature=math.nan), ValueError,
         ("temperature", "nan")),
    Case("new-temperature-string", sample(ids(1, 2), temperature="hot"), ValueError,
         ("temperature", "'hot'")),
    Case("new-top_k-zero", sample(ids(1, 2), top_k=0), ValueError, ("top_k", "0")),
    Case("new-top_k-float", sample(ids(1, 2), top_k=2.5), ValueError, ("top_k", "2.5")),
    Case("new-seed-negative", sample(ids(1, 2), seed=-1), ValueError, ("seed", "-1")),
    Case("new-sample-float-ids", sample(torch.tensor([[1.5]])), TypeError, ("input_ids", "float")),
    Case("new-stream-id-beyond-vocab", stream(ids(1, 96)), ValueError,
         ("input_ids", "96", "vocab_size 96")),
    Case("new-stream-beyond-context", stream(LONG, 7), ValueError, ("250", "257", "256")),
    Case("new-fast-id-beyond-vocab", fast(ids(1, 200)), ValueError, ("input_ids", "200")),
    Case("new-fast-max_new_tokens-zero", fast(ids(1, 2), 0), ValueError,
         ("max_new_tokens", "0")),
    Case("new-fast-beyond-context", fast(LONG, 10), ValueError, ("260", "256")),
    Case("new-fast-float-ids", fast(torch.tensor([[1.0, 2.0]])), TypeError, ("float32",)),
    Case("new-fast-not-a-llama", _not_a_llama, TypeError, ("Llama", "Linear")),
    Case("new-fast-attention-unknown", fast(ids(1, 2), attention="flash"), ValueError,
         ("attention", "'flash'")),
    Case("new-chat-max_new_tokens-zero", chat(max_new_tokens=0), ValueError,
         ("max_new_tokens", "0"), setup=with_tokenizer()),
    Case("new-chat-empty-question", chat("  "), ValueError, ("question", "'  '"),
         setup=with_tokenizer()),
    Case("new-chat-system-not-a-string", chat(system=5), TypeError, ("system", "int"),
         setup=with_tokenizer()),
    Case("new-chat-no-template", chat(), ValueError, ("chat template",),
         setup=with_tokenizer(template=False)),
    Case("B19-chat-generated-id-beyond-tokenizer", chat(), ValueError,
         ("generated token", "200", "vocab_size 128"), setup=with_tokenizer(generated=200)),
    Case("B19-decode-check", _decode_check, ValueError, ("ids to decode", "99999", "128")),
]


# --------------------------------------------------------------------------- 3. results


def record(**kw: Any) -> Callable[[Ctx], Any]:
    base = {"study": "s1", "metric": "m", "value": 1.0, "unit": "ms"}

    def act(ctx: Ctx) -> Any:
        args = {**base, **kw}
        return results.record(args.pop("study"), args.pop("metric"), args.pop("value"),
                              args.pop("unit"), **args)

    return act


def good_record(ctx: Ctx) -> None:
    results.record("s1", "m", 1.0, "ms", params={"n": 1})


def bad_line(change: dict | str | bytes, study: str = "s1") -> Callable[[Ctx], None]:
    """Setup: a good record of ``study``, then line 2 a copy of it changed (or raw text)."""

    def setup(ctx: Ctx) -> None:
        rec = results.record(study, "m", 1.0, "ms", params={"n": 1})
        path = results._results_file(study, rec["machine"])
        ctx.extra["file"] = path
        if isinstance(change, dict):
            line = json.dumps({**rec, **change}).encode()
        else:
            line = change if isinstance(change, bytes) else change.encode()
        with path.open("ab") as fh:
            fh.write(line + b"\n")

    return setup


def load_records(study: str | None = "s1", **kw: Any) -> Callable[[Ctx], Any]:
    return lambda ctx: results.load_results(study, **kw)


def line_case(id: str, change: Any, *names: str) -> Case:
    return Case(id, load_records(), ValueError, (".jsonl:2:", *names), setup=bad_line(change))


def _corrupt_fingerprint(ctx: Ctx) -> None:
    from labkit.core import env, paths

    good_record(ctx)
    (paths.results_dir() / "machines" / f"{env.machine_id()}.json").write_text("{not json")


def latest(**filters: Any) -> Callable[[Ctx], Any]:
    return lambda ctx: results.latest(results.load_results("s1"), **filters)


RESULTS = [
    Case("new-record-value-string", record(value="fast"), ValueError, ("'m'", "'fast'")),
    Case("new-record-value-nan", record(value=math.nan), ValueError, ("'m'", "nan")),
    Case("new-record-value-inf", record(value=math.inf), ValueError, ("'m'", "inf")),
    Case("new-record-value-bool", record(value=True), ValueError, ("'m'", "True")),
    Case("new-record-value-none", record(value=None), ValueError, ("'m'", "None")),
    Case("C26-record-value-beyond-float", record(value=10**400), ValueError,
         ("'m'", "beyond the float range")),
    Case("new-record-value-numpy-nan", record(value=np.float64("nan")), ValueError, ("nan",)),
    Case("new-record-value-tensor", record(value=torch.tensor(1.0)), ValueError,
         ("Tensor", ".item()")),
    Case("C13-record-params-int-key", record(params={1: "a"}), ValueError,
         ("params", "key 1", "type int", "str")),
    Case("new-record-params-nested-int-key", record(params={"a": {2: "b"}}), ValueError,
         ("key 2", "params['a']")),
    Case("new-record-params-nan", record(params={"x": math.nan}), ValueError, ("params", "nan")),
    Case("new-record-params-beyond-float", record(params={"n": 10**400}), ValueError,
         ("params['n']", "beyond the float range")),
    Case("new-record-params-a-string", record(params="seq=8"), ValueError, ("params", "str")),
    Case("new-record-params-unserialisable", record(params={"f": object()}), ValueError,
         ("params", "object")),
    Case("new-record-study-empty", record(study=""), ValueError, ("study", "''")),
    Case("new-record-study-a-path", record(study="../etc"), ValueError, ("study", "'../etc'")),
    Case("new-record-study-machines", record(study="machines"), ValueError,
         ("study", "reserved")),
    Case("new-record-metric-empty", record(metric=""), ValueError, ("metric", "''")),
    Case("new-record-unit-empty", record(unit=""), ValueError, ("unit", "''")),
    Case("new-record-runtime-none", record(runtime=None), ValueError, ("runtime", "None")),
    Case("new-record-model-int", record(model=5), ValueError, ("model", "5")),
    Case("new-record-many-one-bad",
         lambda c: results.record_many([{"study": "s1", "metric": "a", "value": 1.0, "unit": "ms"},
                                        {"study": "s1", "metric": "b", "value": "x", "unit": "ms"}]),
         ValueError, ("'b'", "'x'")),
    Case("new-record-many-not-a-list", lambda c: results.record_many({"study": "s1"}),
         ValueError, ("records", "list")),
    line_case("D04-value-a-string", {"value": "fast"}, "'fast'", "str"),
    line_case("D06-created-not-iso", {"created": "yesterday"}, "created", "'yesterday'",
              "ISO 8601"),
    Case("D16-value-nan", load_records(), ValueError, (".jsonl:2:", "nan"),
         setup=bad_line('{"study": "s1", "metric": "m", "value": NaN, "unit": "ms", '
                        '"runtime": "torch", "device": "cpu", "model": "", "params": {}, '
                        '"machine": "x", "git_rev": "unknown", '
                        '"created": "2026-01-01T00:00:00+00:00"}')),
    Case("D11-invalid-utf8", load_records(), ValueError, (".jsonl:2:", "not UTF-8", "byte"),
         setup=bad_line(b'{"study": "s1", "metric": "\xff"}')),
    Case("D13-all-studies-name-the-bad-file", load_records(None), ValueError,
         ("s1", ".jsonl:2:", "not UTF-8"), setup=bad_line(b"\xff\xfe")),
    Case("D09-unknown-study", load_records("nosuch_study"), ValueError,
         ("'nosuch_study'", "known studies", "s1"), setup=good_record),
    Case("new-load-study-a-path", load_records("../x"), ValueError, ("study", "'../x'")),
    line_case("new-line-corrupt-json", '{"study": "s1", "metr', "corrupt results line"),
    line_case("new-line-a-list", "[1, 2]", "exactly keys", "list"),
    line_case("new-line-missing-keys", '{"study": "s1"}', "exactly keys"),
    line_case("new-line-blank", "", "corrupt results line"),
    Case("new-line-value-overflows-to-inf", load_records(), ValueError, (".jsonl:2:", "inf"),
         setup=bad_line(json.dumps({"study": "s1", "metric": "m", "unit": "ms",
                                    "runtime": "torch", "device": "cpu", "model": "",
                                    "params": {}, "machine": "x", "git_rev": "unknown",
                                    "created": "2026-01-01T00:00:00+00:00"})
                        .replace('"metric"', '"value": 1e400, "metric"'))),
    line_case("new-line-study-of-another-folder", {"study": "s2"}, "'s2'", "'s1'"),
    line_case("new-line-params-a-list", {"params": [1, 2]}, "params", "[1, 2]"),
    line_case("new-line-unit-empty", {"unit": ""}, "unit", "''"),
    line_case("new-line-value-bool", {"value": True}, "True"),
    line_case("new-line-created-a-number", {"created": 5}, "created", "5"),
    Case("new-load-bad_lines-unknown", load_records(bad_lines="ignore"), ValueError,
         ("bad_lines", "'ignore'", "skip"), setup=good_record),
    Case("new-fingerprint-corrupt", load_records(), ValueError, ("machines", ".json", "corrupt"),
         setup=_corrupt_fingerprint),
    Case("D15-latest-unknown-metric", latest(metric="nosuch"), ValueError,
         ("metric='nosuch'", "metric values here: m"), setup=good_record),
    Case("new-latest-unknown-runtime", latest(runtime="mlx"), ValueError,
         ("runtime='mlx'", "torch"), setup=good_record),
    Case("new-latest-unknown-column", latest(colour="red"), ValueError, ("colour",),
         setup=good_record),
]


# --------------------------------------------------------------------------- 4. figures


def figure(title: str = "t", xlabel: str = "x (s)", ylabel: str = "y (ms)",
           plot: bool = True) -> Any:
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    if plot:
        ax.plot([0, 1], [0, 1])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def save(make: Callable[[], Any], name: str = "p_fig", **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        import matplotlib.pyplot as plt

        from labkit.core import plotting

        obj = make()
        try:
            return plotting.save_figure(obj, name, **kw)
        finally:
            plt.close("all")

    return act


def figures_folder(ctx: Ctx) -> None:
    """Setup: figures/ exists, as in a real lab (a failed save must leave it as it was)."""
    from labkit.core import paths

    paths.figures_dir().mkdir(parents=True)


def _no_axes() -> Any:
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    fig.delaxes(ax)
    return fig


FIGURES = [
    Case("E07-figure-none", save(lambda: None, "p_none"), TypeError,
         ("'p_none'", "Figure", "NoneType")),
    Case("E08-figure-an-axes", save(lambda: figure()[1], "p_axes"), TypeError,
         ("'p_axes'", "Axes", "ax.figure")),
    Case("E10-broken-mathtext-title", save(lambda: figure(title=r"$\frac{1}{$")[0], "p_math"),
         ValueError, ("'p_math'", "could not be drawn", r"\frac{1}{"), setup=figures_folder),
    Case("new-figure-a-string", save(lambda: "fig.png"), TypeError, ("'p_fig'", "str")),
    Case("new-figure-no-title", save(lambda: figure(title="")[0]), ValueError, ("no title",)),
    Case("new-figure-no-x-label", save(lambda: figure(xlabel="")[0]), ValueError,
         ("no x label",)),
    Case("new-figure-no-y-label", save(lambda: figure(ylabel="")[0]), ValueError,
         ("no y label",)),
    Case("new-figure-no-axes", save(_no_axes), ValueError, ("no axes",)),
    Case("new-figure-name-with-folder", save(lambda: figure()[0], "figs/x"), ValueError,
         ("'figs/x'", "no folder")),
    Case("new-figure-name-with-extension", save(lambda: figure()[0], "x.png"), ValueError,
         ("'x.png'", "extension")),
    Case("new-figure-name-empty", save(lambda: figure()[0], ""), ValueError, ("name", "''")),
    Case("new-figure-params-unserialisable", save(lambda: figure()[0], params={"f": object()}),
         ValueError, ("params", "JSON")),
    Case("new-figure-params-nan", save(lambda: figure()[0], params={"x": math.nan}),
         ValueError, ("params", "finite")),
    Case("new-figure-env-params-not-json", save(lambda: figure()[0]), ValueError,
         ("LABKIT_PARAMS", "JSON"), setup=lambda c: c.mp.setenv("LABKIT_PARAMS", "{oops")),
]


# --------------------------------------------------------------------------- 5. export


def gguf(file_type: str = "F16", out: str = "out/model.gguf", **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.export.gguf import export_gguf

        return export_gguf(ctx.model_dir, ctx.root / out, file_type, **kw)

    return act


def gguf_case(id: str, setup: Callable[[Ctx], None], exc: type[BaseException], *names: str,
              **kw: Any) -> Case:
    return Case(id, gguf(**kw), exc, names, setup=setup)


def _bpe_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer.json, so the GGUF exporter gets past the tokenizer check."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(97 + i): i for i in range(26)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def onnx(model: Callable[[], Any], out: str = "out/m.onnx", **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.export.onnx import export_onnx

        return export_onnx(model(), ctx.root / out, **kw)

    return act


def coreml(model: Callable[[], Any] = tiny, steps: Any = "a", max_len: Any = 8,
           out: str = "pkgs", **kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.export.coreml import convert

        return convert(model(), steps, ctx.root / out, max_len, **kw)

    return act


def _step_module(ctx: Ctx) -> Any:
    from labkit.export.coreml import step_module

    return step_module(tiny(), "g", 8)


EXPORT = [
    gguf_case("H02-truncated-safetensors", model_copy(edit=truncate), ModelLoadError,
              "model.safetensors", "truncated"),
    gguf_case("H03-garbage-safetensors-header", model_copy(edit=garbage_header), ModelLoadError,
              "model.safetensors", "corrupt safetensors header"),
    gguf_case("H08-config-without-vocab_size", model_copy(drop=("vocab_size",)), ModelLoadError,
              "config.json", "vocab_size"),
    gguf_case("H09-tensor-shape-vs-config", model_copy(edit=edit_tensors(_transpose_down)),
              ModelLoadError, "model.safetensors", "down_proj", "[64, 128]"),
    gguf_case("H10-config-not-json", model_copy(edit=write("config.json", '{"a": 1,,}')),
              ModelLoadError, "config.json", "not valid JSON"),
    gguf_case("new-gguf-file-type-unknown", model_copy(), ValueError, "file_type", "'Q5_K'",
              file_type="Q5_K"),
    gguf_case("new-gguf-out-path-a-folder", lambda c: (model_copy()(c), (c.root / "out").mkdir()),
              ValueError, "out_path", "is a folder", out="out"),
    gguf_case("new-gguf-out-parent-a-file",
              lambda c: (model_copy()(c), (c.root / "out").write_text("a file")), ValueError,
              "out_path", "is a file"),
    gguf_case("new-gguf-name-empty", model_copy(), ValueError, "name", "''", name=""),
    gguf_case("new-gguf-phi-folder", model_copy({"architectures": ["PhiForCausalLM"]}),
              ModelLoadError, "config.json", "Llama only"),
    gguf_case("new-gguf-tokenizer-not-bpe", model_copy(), ValueError, "tokenizer.json",
              "byte-level BPE"),
    gguf_case("new-gguf-tokenizer-not-json",
              model_copy(edit=write("tokenizer.json", "{nope")), ValueError,
              "tokenizer.json", "not valid JSON"),
    gguf_case("new-gguf-tokenizer-bpe-without-vocab",
              model_copy(edit=lambda f: f.joinpath("tokenizer.json").write_text(json.dumps(
                  {"added_tokens": [], "model": {"type": "BPE", "vocab": {}},
                   "pre_tokenizer": {"type": "ByteLevel"}}))),
              ValueError, "tokenizer.json", "vocab"),
    gguf_case("new-gguf-model-dir-none", lambda c: setattr(c, "model_dir", None), TypeError,
              "model_dir", "None"),
    gguf_case("new-gguf-folder-missing", lambda c: setattr(c, "model_dir", c.root / "nope"),
              ModelLoadError, "nope", "config.json"),
    Case("new-gguf-bpe-ok-but-missing-tensor", gguf(), ModelLoadError, ("missing tensor",),
         setup=model_copy(edit=lambda f: (_bpe_tokenizer(f), edit_tensors(_drop_tensor)(f)))),
    Case("new-onnx-not-a-llama", onnx(lambda: torch.nn.Linear(2, 2)), TypeError,
         ("export_onnx", "Linear")),
    Case("new-onnx-opset-zero", onnx(tiny, opset=0), ValueError, ("opset", "0")),
    Case("new-onnx-out-path-a-folder", onnx(tiny, out="out"), ValueError,
         ("out_path", "is a folder"), setup=lambda c: (c.root / "out").mkdir()),
    Case("new-coreml-step-unknown", coreml(steps=["a", "z"]), ValueError, ("step", "'z'")),
    Case("new-coreml-max_len-zero", coreml(max_len=0), ValueError, ("max_len", "0")),
    Case("new-coreml-max_len-beyond-context", coreml(max_len=1000), ValueError,
         ("max_len", "1000", "1..256")),
    Case("new-coreml-max_len-float", coreml(max_len=8.0), ValueError, ("max_len", "8.0")),
    Case("new-coreml-not-a-llama", coreml(model=lambda: torch.nn.Linear(2, 2)), TypeError,
         ("Llama", "Linear")),
    Case("new-coreml-out-dir-a-file", coreml(), ValueError, ("out_dir", "is a file"),
         setup=lambda c: (c.root / "pkgs").write_text("x")),
    Case("new-coreml-on_done-not-callable", coreml(on_done="print"), TypeError, ("on_done",)),
    Case("new-coreml-step_module-unknown", _step_module, ValueError, ("step", "'g'")),
]


# --------------------------------------------------------------------------- 6. the CLI


def cli(*argv: str) -> Callable[[Ctx], Any]:
    """Act: ``labkit ARGV``; a non-zero exit raises Refused with the code and all output."""

    def act(ctx: Ctx) -> Any:
        from labkit.lab import cli as labkit_cli

        out, err = io.StringIO(), io.StringIO()
        code: Any = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = labkit_cli.main(list(argv))
            except SystemExit as exc:
                code = exc.code
        if code != 0:
            raise Refused(f"exit {code}: {out.getvalue()}{err.getvalue()}")
        return out.getvalue()

    return act


def lab_notebooks(quick: str | None = None, models: str | None = None,
                  stems: tuple[str, ...] = ("00_tour",)) -> Callable[[Ctx], None]:
    """Setup: the lab's real notebooks ``stems`` copied in, with this quick.yml / models.yml."""

    def setup(ctx: Ctx) -> None:
        folder = ctx.root / "notebooks"
        folder.mkdir()
        for stem in stems:
            shutil.copy(NOTEBOOKS / f"{stem}.ipynb", folder)
        if quick is not None:
            (folder / "quick.yml").write_text(quick)
        if models is not None:
            (folder / "models.yml").write_text(models)

    return setup


def cli_case(id: str, argv: tuple[str, ...], *names: str,
             setup: Callable[[Ctx], None] | None = None) -> Case:
    return Case(id, cli(*argv), Refused, names, setup=setup)


CLI = [
    cli_case("new-cli-jobs-zero", ("reproduce", "--jobs", "0"), "--jobs", "positive", "0"),
    cli_case("new-cli-jobs-negative", ("reproduce", "--jobs", "-1"), "--jobs", "-1"),
    cli_case("new-cli-jobs-a-word", ("reproduce", "--jobs", "two"), "--jobs", "'two'"),
    cli_case("F05-cli-timeout-negative", ("reproduce", "--timeout", "-5", "--only", "00_tour"),
             "--timeout", "> 0", "-5"),
    cli_case("new-cli-timeout-zero", ("reproduce", "--timeout", "0"), "--timeout", "> 0"),
    cli_case("new-cli-timeout-nan", ("reproduce", "--timeout", "nan"), "--timeout", "finite"),
    cli_case("new-cli-timeout-inf", ("reproduce", "--timeout", "inf"), "--timeout", "finite"),
    cli_case("G02-cli-only-empty", ("reproduce", "--only", ""), "--only", "''", "empty",
             setup=lab_notebooks()),
    cli_case("new-cli-only-commas", ("reproduce", "--only", " , "), "--only", "' , '",
             setup=lab_notebooks()),
    cli_case("new-cli-only-no-match", ("reproduce", "--only", "99"), "'99'", "no notebook",
             setup=lab_notebooks()),
    cli_case("G08-cli-quick-yml-invalid", ("reproduce", "--quick"), "quick.yml", "invalid YAML",
             "started at line 2", setup=lab_notebooks(quick="00_tour:\n  REPEATS: [1, 2\n")),
    cli_case("G07-cli-quick-yml-entry-a-list", ("reproduce", "--quick"), "quick.yml",
             "'00_tour'", "mapping", "[1, 2]", setup=lab_notebooks(quick="00_tour: [1, 2]\n")),
    cli_case("new-cli-quick-yml-unknown-stem", ("reproduce", "--quick"), "quick.yml",
             "'00_tuor'", "names no notebook", setup=lab_notebooks(quick="00_tuor: {}\n")),
    cli_case("new-cli-quick-yml-value-of-wrong-type", ("reproduce", "--quick"), "REPEATS",
             "'3'", "an int", setup=lab_notebooks(quick="00_tour:\n  REPEATS: '3'\n")),
    cli_case("new-cli-quick-yml-unknown-parameter", ("reproduce", "--quick"),
             "unknown parameter", "REPAETS", setup=lab_notebooks(quick="00_tour:\n  REPAETS: 3\n")),
    cli_case("new-cli-quick-yml-a-list", ("reproduce", "--quick"), "quick.yml", "mapping",
             setup=lab_notebooks(quick="- 00_tour\n")),
    cli_case("new-cli-models-yml-invalid", ("reproduce",), "models.yml", "invalid YAML",
             setup=lab_notebooks(models="00_tour: [a\n")),
    cli_case("new-cli-models-yml-entry-a-string", ("reproduce",), "models.yml", "'00_tour'",
             "must be a list of names", setup=lab_notebooks(models="00_tour: smollm2-135m\n")),
    cli_case("new-cli-models-yml-unknown-stem", ("reproduce",), "models.yml", "'99_x'",
             setup=lab_notebooks(models="99_x: [tiny-llama]\n")),
    cli_case("new-cli-models-yml-model-for-a-notebook-without-model", ("reproduce",), "MODEL",
             "unknown parameter", setup=lab_notebooks(models="00_tour: [tiny-llama]\n")),
    cli_case("new-cli-bench-prompt-zero", ("bench", "runtimes", "--prompt", "0"), "--prompt",
             "positive"),
    cli_case("new-cli-bench-gen-negative", ("bench", "runtimes", "--gen", "-3"), "--gen", "-3"),
    cli_case("new-cli-bench-prompt-a-word", ("bench", "runtimes", "--prompt", "x"), "--prompt",
             "'x'"),
    cli_case("new-cli-bench-runtimes-empty", ("bench", "runtimes", "--runtimes", ","),
             "--runtimes", "','"),
    cli_case("new-cli-bench-takes-no-model", ("bench", "bandwidth", "--model", "tiny-llama"),
             "bandwidth", "takes no --model"),
    cli_case("new-cli-bench-unknown", ("bench", "kv-cahce"), "'kv-cahce'", "kv-cache"),
    cli_case("new-cli-bench-rag-model-a-decoder", ("bench", "rag", "--quick", "--model",
                                                   "tiny-llama"),
             "exit 1", "'tiny-llama'", "LlamaForCausalLM", "encoder"),
    cli_case("F10-cli-bench-kv-cache-model-missing",
             ("bench", "kv-cache", "--quick", "--model", "models/does_not_exist"),
             "exit 1", "models/does_not_exist", "no local folder"),
    cli_case("new-cli-chat-max-new-tokens-zero", ("chat", "hi", "--max-new-tokens", "0"),
             "--max-new-tokens", "positive"),
    cli_case("new-cli-chat-model-missing", ("chat", "hi", "--model", "no/such/chat-model"),
             "no/such/chat-model", "missing folder"),
    cli_case("new-cli-chat-device-gpu", ("chat", "hi", "--model", "tiny-llama", "--device", "gpu"),
             "device", "'gpu'"),
    cli_case("new-cli-unknown-command", ("serve",), "invalid choice", "'serve'"),
    Case("new-bench-kv-cache-loads-everything-before-recording", lambda c: _kv_bench(c),
         ModelLoadError, ("transformers could not load",), setup=lambda c: _stub_kv_setup(c)),
]


def _stub_kv_setup(ctx: Ctx) -> None:
    """The kv-cache benchmark with its labkit model loaded (stubbed) and transformers' load
    failing: no record may be written before that second load."""
    from conftest import tiny_config

    from labkit.studies import kv_cache

    stub = type("Setup", (), {"cfg": tiny_config(), "model": tiny(), "records": []})()
    ctx.mp.setattr(kv_cache, "setup", lambda *a, **k: stub)

    def failing_load(name: str, **kw: Any) -> Any:
        raise ModelLoadError(name, "transformers could not load the model: (stub)")

    ctx.mp.setattr("labkit.models.load", failing_load)


def _kv_bench(ctx: Ctx) -> Any:
    from labkit.studies import kv_cache

    return kv_cache.bench(quick=True, model="tiny-llama")


# --------------------------------------------------------------------------- 7. notebook parameters


def nb_params(stem: str, **values: Any) -> Callable[[Ctx], Any]:
    """Act: ``values`` checked against the real notebook's parameters cell (no kernel)."""

    def act(ctx: Ctx) -> Any:
        from labkit.lab import reproduce

        return reproduce.check_notebook_parameters(NOTEBOOKS / f"{stem}.ipynb", values)

    return act


def kernel_check(stem: str, injected: str) -> Callable[[Ctx], Any]:
    """Act: check_parameters over a kernel's history as papermill leaves it: the parameters
    cell, the injected cell, the checking cell (the namespace holds the injected values)."""

    def act(ctx: Ctx) -> Any:
        from labkit.core.params import check_parameters
        from labkit.lab import reproduce

        source = reproduce.parameters_source(NOTEBOOKS / f"{stem}.ipynb")
        namespace: dict[str, Any] = {}
        exec(source, {}, namespace)  # noqa: S102 - the lab's own parameters cell
        exec(injected, {}, namespace)  # noqa: S102 - what papermill would inject
        namespace["In"] = ["", source, injected, "check_parameters(globals())"]
        return check_parameters(namespace)

    return act


def run_nb(stem: str = "00_tour", **kw: Any) -> Callable[[Ctx], Any]:
    """Act: reproduce.run_notebook of the lab's copy; a failed run raises Refused."""

    def act(ctx: Ctx) -> Any:
        from labkit.lab import reproduce

        run = reproduce.run_notebook(ctx.root / "notebooks" / f"{stem}.ipynb", **kw)
        if run.status != "ok":
            raise Refused(f"{run.status}: {run.error}")
        return run

    return act


def repro(**kw: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.lab import reproduce

        return reproduce.reproduce(progress=False, **kw)

    return act


def quick_params(stem: str = "00_tour", model: str | None = None) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.lab import reproduce

        return reproduce.quick_parameters(stem, model=model)

    return act


def discover(only: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        from labkit.lab import reproduce

        return reproduce.discover(only)

    return act


PARAMS = [
    Case("P01-QUICK-no", nb_params("00_tour", QUICK="no"), TypeError,
         ("QUICK", "'no'", "bool", "False")),
    Case("P01-QUICK-yes", nb_params("00_tour", QUICK="yes"), TypeError, ("QUICK", "'yes'")),
    Case("new-QUICK-one", nb_params("00_tour", QUICK=1), TypeError, ("QUICK", "1", "bool")),
    Case("P02-MAX_BUFFER_MB-64MB", nb_params("00_tour", MAX_BUFFER_MB="64MB"), TypeError,
         ("MAX_BUFFER_MB", "'64MB'", "an int", "256")),
    Case("new-MAX_BUFFER_MB-float", nb_params("00_tour", MAX_BUFFER_MB=64.0), TypeError,
         ("MAX_BUFFER_MB", "64.0", "an int")),
    Case("new-REPEATS-bool", nb_params("00_tour", REPEATS=True), TypeError, ("REPEATS", "True")),
    Case("new-parameter-misspelt", nb_params("00_tour", MAX_BUFER_MB=64), ValueError,
         ("unknown parameter", "MAX_BUFER_MB", "MAX_BUFFER_MB")),
    Case("new-list-parameter-a-string", nb_params("01_kv_cache", PROMPT_LENS="16,64"), TypeError,
         ("PROMPT_LENS", "'16,64'", "a list")),
    Case("new-list-parameter-element-a-string", nb_params("01_kv_cache", PROMPT_LENS=[16, "64"]),
         TypeError, ("PROMPT_LENS", "element 1", "'64'", "an int")),
    Case("new-list-parameter-an-int", nb_params("01_kv_cache", THREADS=2), TypeError,
         ("THREADS", "2", "a list")),
    Case("new-str-parameter-an-int", nb_params("01_kv_cache", MODEL=7), TypeError,
         ("MODEL", "7", "a str")),
    Case("new-DEVICE-not-a-choice", nb_params("03_quantization_error", DEVICE="gpu"), ValueError,
         ("DEVICE", "'gpu'", "'auto', 'cpu', 'cuda', 'mps'")),
    Case("new-DEVICE-cuda-where-not-listed", nb_params("09_will_it_fit", DEVICE="cuda"),
         ValueError, ("DEVICE", "'cuda'", "'auto', 'cpu', 'mps'")),
    Case("new-list-of-str-element-an-int", nb_params("03_quantization_error", SCHEMES=[1]),
         TypeError, ("SCHEMES", "element 0", "a str")),
    Case("new-None-where-the-comment-does-not-allow-it", nb_params("06_flash_attention",
                                                                   THREADS=None),
         TypeError, ("THREADS", "None", "an int")),
    Case("new-tuple-unpacked-parameter-a-string", nb_params("06_flash_attention", BATCH="1"),
         TypeError, ("BATCH", "'1'", "an int")),
    Case("new-None-allowed-but-not-a-string", nb_params("07_paged_kv_cache", THREADS="all"),
         TypeError, ("THREADS", "'all'", "an int")),
    Case("new-str-parameter-a-list", nb_params("08_runtime_benchmark", RUNTIMES=["torch-eager"]),
         TypeError, ("RUNTIMES", "a str")),
    Case("new-float-parameter-a-string", nb_params("04_swift_port_parity", LOGIT_TOL="1e-4"),
         TypeError, ("LOGIT_TOL", "'1e-4'", "a number")),
    Case("new-float-parameter-nan", nb_params("04_swift_port_parity", LOGIT_TOL=math.nan),
         ValueError, ("LOGIT_TOL", "nan", "finite")),
    Case("new-list-parameter-from-a-string", nb_params("02_pytorch_vs_coreml", STEPS="abc"),
         TypeError, ("STEPS", "'abc'", "a list")),
    Case("new-int-list-element-a-float", nb_params("10_rag_on_device", K_VALUES=[1.5]),
         TypeError, ("K_VALUES", "1.5", "an int")),
    Case("P01-in-the-kernel-QUICK-no", kernel_check("00_tour", '# Parameters\nQUICK = "no"\n'),
         TypeError, ("QUICK", "'no'", "bool", "papermill")),
    Case("P02-in-the-kernel-MAX_BUFFER_MB", kernel_check(
        "00_tour", '# Parameters\nMAX_BUFFER_MB = "64MB"\nREPEATS = 1\n'), TypeError,
        ("MAX_BUFFER_MB", "'64MB'", "an int")),
    Case("new-in-the-kernel-misspelt", kernel_check("01_kv_cache", "# Parameters\nGEN_LNE = 8\n"),
         ValueError, ("unknown parameter", "GEN_LNE")),
    Case("new-in-the-kernel-DEVICE", kernel_check("05_encoder_vs_decoder",
                                                  '# Parameters\nDEVICE = "tpu"\n'),
         ValueError, ("DEVICE", "'tpu'", "'mps'")),
    Case("new-run_notebook-refuses-quick-value", run_nb(quick=True), Refused,
         ("failed", "nothing ran", "REPEATS", "'3'"),
         setup=lab_notebooks(quick="00_tour:\n  REPEATS: '3'\n")),
    Case("new-run_notebook-refuses-model-value", run_nb(quick=False, model="tiny-llama"), Refused,
         ("MODEL", "unknown parameter"), setup=lab_notebooks()),
    Case("new-run_notebook-timeout-negative", run_nb(quick=False, timeout=-5), ValueError,
         ("timeout", "-5"), setup=lab_notebooks()),
    Case("G08-quick-yml-invalid", quick_params(), ValueError,
         ("quick.yml", "invalid YAML", "line 1"), setup=lab_notebooks(quick="00_tour: {a: [}\n")),
    Case("G07-quick-yml-entry-a-list", quick_params(), ValueError,
         ("quick.yml", "'00_tour'", "mapping", "list"), setup=lab_notebooks(quick="00_tour: [1, 2]\n")),
    Case("new-quick-yml-model-entry-a-string", quick_params(model="m"), ValueError,
         ("quick.yml", "'00_tour@m'", "mapping"), setup=lab_notebooks(quick="00_tour@m: fast\n")),
    Case("new-quick-yml-parameter-name-not-a-name", quick_params(), ValueError,
         ("quick.yml", "'00_tour'", "'max-buffer'"),
         setup=lab_notebooks(quick="00_tour:\n  max-buffer: 3\n")),
    Case("new-quick-yml-not-utf8", quick_params(), ValueError, ("quick.yml", "UTF-8"),
         setup=lambda c: (lab_notebooks()(c), (c.root / "notebooks" / "quick.yml").write_bytes(
             b"00_tour:\n  REPEATS: \xff\n"))),
    Case("G02-discover-empty", discover(""), ValueError, ("--only", "''"), setup=lab_notebooks()),
    Case("new-discover-not-a-string", discover(5), TypeError, ("only", "5")),
    Case("new-reproduce-jobs-zero", repro(jobs=0), ValueError, ("jobs", "0")),
    Case("F05-reproduce-timeout-negative", repro(timeout=-5), ValueError, ("timeout", "-5")),
    Case("new-reproduce-only-blank", repro(only=" , "), ValueError, ("--only", "' , '"),
         setup=lab_notebooks()),
    Case("new-reproduce-quick-value-stops-the-run", repro(quick=True), TypeError,
         ("REPEATS", "'3'"),
         setup=lab_notebooks(quick="00_tour:\n  REPEATS: '3'\n")),
]


CASES = LOADING + GENERATION + RESULTS + FIGURES + EXPORT + CLI + PARAMS


# --------------------------------------------------------------------------- the tests


def snapshot(root: Path) -> dict[str, str]:
    """Every file (its bytes' hash) and folder under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lab"
    root.mkdir()
    monkeypatch.setenv("LABKIT_ROOT", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns otherwise
    for name in ("LABKIT_OUTPUT_ROOT", "LABKIT_NOTEBOOK", "LABKIT_PARAMS", "LABKIT_VARIANT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(root)
    results._fingerprints_written.clear()
    results._git_rev_cache.clear()
    return root


def test_the_table_is_big_and_covers_every_probe_row() -> None:
    assert len(CASES) >= 150, len(CASES)
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    missing = [row for row in PROBE_ROWS if not any(i.startswith(row + "-") for i in ids)]
    assert not missing, f"probe rows without a case: {missing}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_a_clear_error_and_changes_nothing(case: Case, lab: Path, checkpoint: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = Ctx(root=lab, checkpoint=checkpoint, mp=monkeypatch)
    if case.setup is not None:
        case.setup(ctx)
    before = snapshot(lab)
    with pytest.raises(case.exc) as raised:
        case.act(ctx)
    message = str(raised.value)
    for name in case.names:
        assert name in message, f"{name!r} not named in: {message}"
    assert snapshot(lab) == before, "a refused input changed files"


# --------------------------------------------------------------------------- beside the table


def test_load_results_can_skip_bad_lines_and_one_bad_study_never_breaks_another(lab: Path) -> None:
    bad_line({"value": "fast"})(Ctx(lab, lab, pytest.MonkeyPatch()))
    results.record("s2", "m", 2.0, "ms")
    assert len(results.load_results("s2")) == 1  # s1's bad line is not read for s2
    with pytest.warns(UserWarning, match=r"s1.*\.jsonl:2: .*'fast'.*skipped"):
        df = results.load_results(bad_lines="skip")
    assert sorted(zip(df["study"], df["value"], strict=True)) == [("s1", 1.0), ("s2", 2.0)]
    assert df["value"].dtype == np.float64
    with pytest.raises(ValueError, match=r"\.jsonl:2:"):
        results.load_results()


def test_a_known_study_without_records_loads_empty(lab: Path) -> None:
    (lab / "notebooks").mkdir()
    shutil.copy(NOTEBOOKS / "00_tour.ipynb", lab / "notebooks")
    assert "00_tour" in results.known_studies()
    assert results.load_results("00_tour").empty


def test_info_keeps_the_extra_of_an_install_hint(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.core import env

    monkeypatch.setattr(env, "optional_runtimes",
                        lambda: {"llama.cpp": "llama-cpp-python not installed: pip install "
                                              "'labkit[llamacpp]'", "mlx": "[bold]x[/bold]"})
    out = cli("info")(Ctx(lab, lab, monkeypatch))
    assert "pip install 'labkit[llamacpp]'" in out and "[bold]x[/bold]" in out


def test_a_partial_run_never_replaces_the_full_runs_summary(lab: Path) -> None:
    from labkit.lab import reproduce

    run = reproduce.NotebookRun(name="00_tour", status="ok", seconds=1.0)
    full = reproduce.write_summary([run], quick=False, run_id="20260101T000000Z-aaaaaa")
    only = reproduce.write_summary([run], quick=False, run_id="20260102T000000Z-bbbbbb",
                                   full=False)
    latest = json.loads((lab / "build" / "reproduce-summary.json").read_text())
    assert latest["run_id"] == "20260101T000000Z-aaaaaa" and latest["full"]
    assert full.name == "reproduce-summary-20260101T000000Z-aaaaaa.json"
    assert json.loads(only.read_text())["run_id"] == "20260102T000000Z-bbbbbb"


def test_cli_only_run_writes_its_own_summary(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.lab import reproduce

    lab_notebooks()(Ctx(lab, lab, monkeypatch))
    done = reproduce.NotebookRun(name="00_tour", status="ok", seconds=0.0)
    monkeypatch.setattr(reproduce, "reproduce", lambda **kw: [done])
    monkeypatch.setenv("LABKIT_RUN_ID", "20260103T000000Z-cccccc")
    cli("reproduce", "--only", "00")(Ctx(lab, lab, monkeypatch))
    assert (lab / "build" / "reproduce-summary-20260103T000000Z-cccccc.json").is_file()
    assert not (lab / "build" / "reproduce-summary.json").exists()


def test_run_notebook_removes_a_killed_runners_temporary(lab: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """papermill writes the executed copy into a temporary beside it; a runner killed with
    SIGKILL leaves that behind, and the next run into the folder removes it."""
    import subprocess

    from labkit.lab import reproduce

    lab_notebooks()(Ctx(lab, lab, monkeypatch))
    out_dir = lab / "build" / "notebooks"
    stale = out_dir / ".00_tour.ipynb.999999999.0123abcd.tmp"
    (stale / "00_tour.ipynb").parent.mkdir(parents=True)
    (stale / "00_tour.ipynb").write_text("half")

    def fake_papermill(cmd: list[str], **kw: Any) -> Any:
        Path(cmd[4]).write_text("{}")  # papermill's output argument
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(reproduce.subprocess, "run", fake_papermill)
    run = reproduce.run_notebook(lab / "notebooks" / "00_tour.ipynb", quick=False)
    assert run.ok and (out_dir / "00_tour.ipynb").read_text() == "{}"
    assert [p.name for p in out_dir.iterdir()] == ["00_tour.ipynb"]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_notebook_checks_its_parameters_first(path: Path) -> None:
    import nbformat

    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    tags = [c.metadata.get("tags", []) for c in cells]
    at = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert "check_parameters(globals())" in cells[at + 1].source, path.name


def test_the_lab_quick_and_model_parameters_pass_their_checks() -> None:
    from labkit.lab import reproduce

    reproduce.check_tables(NOTEBOOKS)
    jobs = reproduce.jobs_for(reproduce.discover(None, NOTEBOOKS))
    for job in jobs:
        reproduce.job_parameters(job, quick=True)
        reproduce.job_parameters(job, quick=False)


def test_check_parameters_passes_good_values_and_a_run_without_injection() -> None:
    ok = kernel_check("00_tour", "# Parameters\nQUICK = True\nMAX_BUFFER_MB = 64\nREPEATS = 3\n")
    assert ok(None) == {"QUICK": True, "MAX_BUFFER_MB": 64, "REPEATS": 3}
    from labkit.core.params import check_parameters

    assert check_parameters({"In": ["", "QUICK = False", "check_parameters(globals())"]}) == {}
    assert check_parameters({}) == {}  # not a kernel: nothing injected, nothing to check


def test_model_is_an_option_of_every_benchmark_that_loads_one() -> None:
    import inspect

    from labkit.lab import bench

    takes = {name for name in bench.BENCHMARKS
             if "model" in inspect.signature(bench.resolve(name)).parameters}
    assert takes == {"kv-cache", "rag", "runtimes"}  # bandwidth loads no model
