"""Function calling on device, scored on the Berkeley Function Calling Leaderboard (BFCL).

A function-calling model reads a set of tool descriptions (JSON) and a request, and answers with
the calls that serve it: here a JSON list ``[{"name": ..., "arguments": {...}}]``, or ``[]`` when
no tool fits. BFCL (Patil et al., ICML 2025) scores such answers without running the tools: a
call is right when its function name matches and every argument is among the possible answers
it lists. The pieces:

* **Data** (:func:`load_category`): BFCL's own files, read from the ``bfcl-eval`` package with
  ``importlib.resources`` (installed ``--no-deps``: requirements-nodeps.txt says why). Five
  categories: ``simple_python`` (one tool, one call), ``multiple`` (several tools, one call),
  ``parallel`` (one tool, several calls), ``parallel_multiple`` (several of each) and
  ``irrelevance`` (no tool fits: the right answer is no call).
* **Prompts** (:func:`prompt_ids`): the xLAM format (Salesforce's xLAM-1b-fc-r model card: task
  instruction, the tools as JSON, a format instruction, the query, as one user turn of the
  model's chat template), and a second format with the tools in the system turn.
* **Parsing** (:func:`parse_calls`): never raises; text that is not JSON is invalid, as it is for
  BFCL's xLAM handler (``bfcl_eval/model_handler/local_inference/salesforce_llama.py``:
  ``json.loads`` of the whole answer, then of its ``;``-separated parts). One deliberate
  difference: ``{"tool_calls": [...]}``, the wrapper xLAM-1b-fc-r was trained to write, is
  unwrapped, so a user's xLAM folder is scored on its calls.
* **Scoring** (:func:`check`): labkit's own AST check. BFCL's (``bfcl_eval/eval_checker/
  ast_eval/ast_checker.py``) cannot be imported from the package without every hosted-model
  client it pulls in (its module imports ``constants.model_config``, which imports each API
  handler), and a full install pins numpy==1.26.4. The rules, from that source and BFCL's blog
  (gorilla.cs.berkeley.edu/blogs/8_berkeley_function_calling_leaderboard.html, "Evaluating
  function calls"): the function name matches; every required parameter is present and no
  unknown one; each value has the documented type (an int is accepted for a float) and is
  among the possible answers (strings compared without case, spaces and ``,./-_*^``; lists and
  dicts element by element; ``""`` marks an optional parameter); parallel calls match in any
  order; for ``irrelevance``, an answer is right when it holds no call. The opt-in check
  (tests/test_study_function_calling.py, ``LABKIT_TEST_BFCL=1``) installs the full bfcl-eval in
  its own venv (``build/venvs/bfcl``) and compares the two scorers on every item of the five
  categories; its result is ``data/function_calling/bfcl_agreement.json``.
* **Decoding**: greedy, free or constrained by a JSON schema built from the tools
  (:func:`calls_schema`; enforced by ``labkit.inference.constrained``, llguidance), on labkit's
  torch model and on llama.cpp (xllamacpp, used directly through :func:`llamacpp_server`; the
  lab's llama.cpp runtime adapters are separate), with the same prompts, item by item
  interleaved, so the constraint's cost in tokens/s is a paired measurement.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labkit.core import paths
from labkit.core.checks import nonnegative_int, one_of, positive_int
from labkit.core.files import atomic_write_json, atomic_write_text

STUDY = "11_function_calling"
CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
FORMATS = ("xlam", "chat")
BFCL_VERSION = "2026.3.23"
BFCL_INSTALL = f"pip install --no-deps bfcl-eval=={BFCL_VERSION}"

# --- BFCL's data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One BFCL entry: the user's request, the tools offered, and the possible answers
    (``[{name: {param: [allowed values]}}]``, one entry per expected call; None for irrelevance)."""

    id: str
    category: str
    question: str
    functions: list[dict[str, Any]]
    answer: list[dict[str, Any]] | None


def _bfcl_lines(relative: str) -> list[dict[str, Any]]:
    from importlib import resources

    try:
        folder = resources.files("bfcl_eval") / "data"
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"BFCL's data comes from the bfcl-eval package: {BFCL_INSTALL}") from exc
    text = folder.joinpath(relative).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_category(category: str) -> list[Item]:
    """Every item of one BFCL v4 category, with its possible answers."""
    one_of(category, "category", CATEGORIES)
    prompts = _bfcl_lines(f"BFCL_v4_{category}.json")
    answers: dict[str, Any] = {}
    if category != "irrelevance":
        answers = {a["id"]: a["ground_truth"] for a in _bfcl_lines(f"possible_answer/BFCL_v4_{category}.json")}
    items = []
    for entry in prompts:
        users = [turn["content"] for turn in entry["question"][0] if turn["role"] == "user"]
        if category != "irrelevance" and entry["id"] not in answers:
            raise ValueError(f"BFCL item {entry['id']} has no possible answer")
        items.append(Item(entry["id"], category, users[-1], entry["function"], answers.get(entry["id"])))
    return items


def subset(items: Sequence[Item], n: int, seed: int) -> list[Item]:
    """``n`` items drawn without replacement by a generator seeded with ``seed`` and the
    category's position (0: every item), kept in BFCL's order."""
    nonnegative_int(n, "n", "subset")
    if n == 0 or n >= len(items):
        return list(items)
    rng = np.random.default_rng([seed, CATEGORIES.index(items[0].category)])
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


def load_items(categories: Sequence[str], per_category: int, seed: int) -> list[Item]:
    return [item for c in categories for item in subset(load_category(c), per_category, seed)]


# --- prompts -----------------------------------------------------------------------------------

#: xLAM-1b-fc-r's task instruction (its model card, huggingface.co/Salesforce/xLAM-1b-fc-r)
XLAM_TASK = (
    "You are an expert in composing functions. You are given a question and a set of possible "
    "functions. Based on the question, you will need to make one or more function/tool calls to "
    "achieve the purpose. If none of the functions can be used, point it out and refuse to answer. "
    "If the given question lacks the parameters required by the function, also point it out.")
#: the card's format instruction, with the answer a bare JSON list (not {"tool_calls": [...]})
XLAM_FORMAT = (
    "The output MUST strictly adhere to the following JSON format, and NO other text MUST be "
    "included. The example format is as follows. Please make sure the parameter type is correct. "
    "If no function call is needed, please make the output an empty list '[]'.\n"
    '[{"name": "func_name1", "arguments": {"argument1": "value1", "argument2": "value2"}}, '
    "... (more tool calls as required)]")
CHAT_SYSTEM = (
    "You can call these tools:\n{tools}\n\nTo call tools, answer with only a JSON list of calls, "
    'such as [{{"name": "tool_name", "arguments": {{"argument": "value"}}}}]. If no tool fits the '
    "request, answer with an empty list [].")


def xlam_prompt(item: Item) -> str:
    return (f"[BEGIN OF TASK INSTRUCTION]\n{XLAM_TASK}\n[END OF TASK INSTRUCTION]\n\n"
            f"[BEGIN OF AVAILABLE TOOLS]\n{json.dumps(item.functions)}\n[END OF AVAILABLE TOOLS]\n\n"
            f"[BEGIN OF FORMAT INSTRUCTION]\n{XLAM_FORMAT}\n[END OF FORMAT INSTRUCTION]\n\n"
            f"[BEGIN OF QUERY]\n{item.question}\n[END OF QUERY]\n\n")


def formats_for(tokenizer: Any) -> list[str]:
    """The prompt formats a tokenizer can render: both with a chat template, else xLAM as text."""
    return list(FORMATS) if getattr(tokenizer, "chat_template", None) else ["xlam"]


def prompt_ids(tokenizer: Any, item: Item, fmt: str) -> list[int]:
    """Token ids of one item's prompt, ending where the model's answer begins."""
    from labkit.inference.chat import chat_ids

    one_of(fmt, "fmt", FORMATS)
    if fmt == "xlam" and not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(xlam_prompt(item))["input_ids"])
    if fmt == "xlam":
        return chat_ids(tokenizer, xlam_prompt(item))[0].tolist()
    system = CHAT_SYSTEM.format(tools=json.dumps(item.functions))
    return chat_ids(tokenizer, item.question, system=system)[0].tolist()


# --- the JSON schema of an answer --------------------------------------------------------------

#: BFCL's type names -> JSON Schema's (BFCL's own GORILLA_TO_OPENAPI, constants/type_mappings.py)
JSON_TYPES = {"integer": "integer", "float": "number", "number": "number", "string": "string",
              "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array",
              "tuple": "array", "dict": "object", "object": "object", "any": "string"}


def param_schema(spec: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of one BFCL parameter: its type, enum, nested properties or items."""
    if "enum" in spec:
        return {"enum": list(spec["enum"])}
    kind = JSON_TYPES.get(spec.get("type", "string"), "string")
    out: dict[str, Any] = {"type": kind}
    if kind == "object" and "properties" in spec:
        out["properties"] = {k: param_schema(v) for k, v in spec["properties"].items()}
        out["required"] = [r for r in spec.get("required", []) if r in spec["properties"]]
        out["additionalProperties"] = False
    if kind == "array" and isinstance(spec.get("items"), dict):
        out["items"] = param_schema(spec["items"])
    return out


def call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """``{"name": <this function>, "arguments": {its parameters}}``, required ones required."""
    params = function["parameters"]
    props = {k: param_schema(v) for k, v in params.get("properties", {}).items()}
    arguments = {"type": "object", "properties": props, "additionalProperties": False,
                 "required": [r for r in params.get("required", []) if r in props]}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def calls_schema(functions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """An answer: a list (possibly empty) of calls, each to one of ``functions``. llguidance
    writes an object's properties in the schema's order (the tool's documented order); BFCL's
    check does not depend on that order."""
    return {"type": "array", "items": {"anyOf": [call_schema(f) for f in functions]}}


# --- parsing an answer -------------------------------------------------------------------------

_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Parsed:
    """An answer read as calls: ``calls`` in BFCL's decoded form ``[{name: arguments}]``, or None
    when the text is not a list of calls; ``valid_json`` says whether it was JSON at all."""

    calls: list[dict[str, Any]] | None
    valid_json: bool
    error: str = ""

    @property
    def called(self) -> bool:
        """At least one function call (BFCL's irrelevance rule: ``[]`` or no calls is none)."""
        return bool(self.calls)


def _json_value(text: str) -> tuple[Any, bool]:
    s = text.strip()
    for attempt in (lambda: json.loads(s), lambda: [json.loads(p.strip()) for p in s.split(";")]):
        try:
            return attempt(), True
        except (ValueError, RecursionError):
            continue
    return None, False


def parse_calls(text: str) -> Parsed:
    """Read a model's answer as function calls; never raises (garbage is invalid, not an error)."""
    if not isinstance(text, str):
        return Parsed(None, False, f"not text: {type(text).__name__}")
    value, ok = _json_value(text)
    if not ok:
        return Parsed(None, False, "invalid JSON")
    if isinstance(value, dict) and "tool_calls" in value and "name" not in value:
        value = value["tool_calls"]  # xLAM-1b-fc-r's own answer format
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list):
        return Parsed(None, True, "JSON, but not a list of calls")
    calls = []
    for call in value:
        if not (isinstance(call, dict) and "name" in call and "arguments" in call):
            return Parsed(None, True, "a call without name and arguments")
        if not isinstance(call["name"], _SCALARS) or not isinstance(call["arguments"], dict):
            return Parsed(None, True, "arguments are not an object")
        calls.append({call["name"]: call["arguments"]})
    return Parsed(calls, True)


# --- the AST check (BFCL's rules) --------------------------------------------------------------

#: BFCL's parameter types as Python types (ast_checker.py's PYTHON_TYPE_MAPPING)
PY_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list,
            "tuple": list, "dict": dict, "any": str}
_PUNCTUATION = re.compile(r"[ ,./\-_*^]")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    error: str = ""  # what failed first, in BFCL's vocabulary


def standardize(text: str) -> str:
    """BFCL's string normal form: no spaces or ``,./-_*^``, lower case, ' as "."""
    return _PUNCTUATION.sub("", text).lower().replace("'", '"')


def _std(value: Any) -> Any:
    return standardize(value) if type(value) is str else value


def _answer_type(possible: Sequence[Any]) -> type | None:
    return next((type(a) for a in possible if a != ""), None)


def _type_ok(value: Any, possible: Sequence[Any], expected: type, nested: type | None) -> tuple[bool, bool]:
    """(type accepted, value is a "variable"): BFCL accepts a value of the possible answers' type
    when it differs from the documented one, and then compares it as is."""
    answer_type = _answer_type(possible)
    variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if nested is None:
            return True, variable
        for option in possible:  # an option that is not a list ("" = optional) checks nothing
            if type(option) is not list or all(_type_ok(v, option, nested, None)[0] for v in value):
                return True, variable
        return False, False
    if answer_type is not None and type(value) is answer_type:
        return True, True
    return False, False


def _dict_ok(value: Any, possible: Sequence[Any]) -> bool:
    if not isinstance(value, dict):
        return False
    for option in possible:
        if option == "" or not isinstance(option, dict):
            continue
        keys_ok = all(k in option and _std(v) in [_std(x) for x in option[k]] for k, v in value.items())
        if keys_ok and all(k in value or "" in vals for k, vals in option.items()):
            return True
    return False


def _list_of_dicts_ok(value: list, possible: Sequence[Any]) -> bool:
    for option in possible:  # "" (optional) has length 0: it matches an empty list
        if isinstance(option, (list, str)) and len(option) == len(value) and all(
                _dict_ok(v, [o]) for v, o in zip(value, option, strict=True)):
            return True
    return False


def _list_ok(value: list, possible: Sequence[Any]) -> bool:
    options = [[_std(x) for x in option] for option in possible if isinstance(option, (list, str))]
    return [_std(v) for v in value] in options


def check_value(spec: dict[str, Any], value: Any, possible: Sequence[Any]) -> Verdict:
    """One argument against its documented type and its possible answers."""
    kind = spec.get("type")
    if kind not in PY_TYPES:
        raise ValueError(f"BFCL type {kind!r} has no Python type in the AST check")
    expected = PY_TYPES[kind]
    items = spec.get("items")
    nested = PY_TYPES.get(items.get("type")) if kind in ("array", "tuple") and isinstance(items, dict) else None
    if kind == "float" and type(value) is int:
        value = float(value)
    ok, variable = _type_ok(value, possible, expected, nested)
    if not ok:
        return Verdict(False, "type_error")
    if not variable:
        special = {dict: (_dict_ok, "value_error:dict"), str: (_string_ok, "value_error:string")}
        if expected is list:
            special[list] = (_list_of_dicts_ok, "value_error:list_dict") if nested is dict else (
                _list_ok, "value_error:list")
        if expected in special:
            rule, error = special[expected]
            return Verdict(True) if rule(value, possible) else Verdict(False, error)
    return Verdict(True) if value in possible else Verdict(False, "value_error:others")


def _string_ok(value: str, possible: Sequence[Any]) -> bool:
    return standardize(value) in [standardize(p) for p in possible if type(p) is str]


def check_call(function: dict[str, Any], call: dict[str, Any], expected: dict[str, Any]) -> Verdict:
    """One decoded call ``{name: arguments}`` against one expected call ``{name: {param: [...]}}``."""
    name = function["name"]
    if name not in call:
        return Verdict(False, "wrong_name")
    args, possible = call[name], next(iter(expected.values()))
    props = function["parameters"]["properties"]
    if any(p not in args for p in function["parameters"].get("required", [])):
        return Verdict(False, "missing_required")
    for param, value in args.items():
        if param not in props or param not in possible:
            return Verdict(False, "unexpected_param")
        verdict = check_value(props[param], value, possible[param])
        if not verdict.ok:
            return verdict
    if any(p not in args and "" not in values for p, values in possible.items()):
        return Verdict(False, "missing_optional")
    return Verdict(True)


def _function(functions: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(f for f in functions if f["name"] == name)


def _any_order(functions: Sequence[dict[str, Any]], calls: list[dict], answer: list[dict]) -> Verdict:
    """BFCL's parallel rule: each expected call, in turn, takes the first unused call it accepts."""
    used: set[int] = set()
    for expected in answer:
        function = _function(functions, next(iter(expected)))
        hit = next((i for i, call in enumerate(calls)
                    if i not in used and check_call(function, call, expected).ok), None)
        if hit is None:
            return Verdict(False, "no_match_in_any_order")
        used.add(hit)
    return Verdict(True)


def check(item: Item, parsed: Parsed) -> Verdict:
    """Is this answer right for this item, by BFCL's rules?"""
    if item.category == "irrelevance":
        return Verdict(False, "called_a_function") if parsed.called else Verdict(True)
    if parsed.calls is None:
        return Verdict(False, "wrong_format" if parsed.valid_json else "invalid_json")
    answer = item.answer or []
    if len(parsed.calls) != len(answer):
        return Verdict(False, "wrong_count")
    if "parallel" in item.category:
        return _any_order(item.functions, parsed.calls, answer)
    expected = answer[0]
    function = _function(item.functions, next(iter(expected))) if "multiple" in item.category else item.functions[0]
    return check_call(function, parsed.calls[0], expected)


# --- generating answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way of answering: an engine, a prompt format, free or grammar-constrained."""

    engine: str  # "torch" (labkit's model) or "llama.cpp"
    fmt: str
    constrained: bool

    @property
    def name(self) -> str:
        return f"{self.engine} · {self.fmt} · {'constrained' if self.constrained else 'free'}"


def methods(formats: Sequence[str], *, llamacpp: bool) -> list[Method]:
    """Every format free on torch, the first one also constrained; with llama.cpp, the first
    format free and constrained there too. Free and constrained of one engine run back to back
    on each item (:func:`run_items`), so their speeds are paired."""
    first = formats[0]
    out = [Method("torch", first, False), Method("torch", first, True)]
    out += [Method("torch", f, False) for f in formats[1:]]
    if llamacpp:
        out += [Method("llama.cpp", first, False), Method("llama.cpp", first, True)]
    return out


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int  # generated, the end-of-turn token included
    ttft_s: float  # prompt in (and the grammar built), first token chosen
    decode_s: float  # every later token
    stopped: bool  # ended at the end-of-turn token, not at max_new_tokens

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def generate_torch(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int,
                   schema: dict[str, Any] | None = None) -> Answer:
    """Greedy answer on labkit's model; ``schema`` constrains it (the grammar's setup is timed
    inside TTFT: it is part of what a constrained request costs)."""
    import torch

    from labkit.inference.chat import end_token_ids
    from labkit.inference.constrained import JsonSchemaConstraint, ll_tokenizer, stream_constrained

    eos = end_token_ids(model, tokenizer)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    lltok = ll_tokenizer(tokenizer, eos) if schema is not None else None
    start = time.perf_counter()
    constraint = JsonSchemaConstraint(lltok, schema) if schema is not None else None
    out: list[int] = []
    first, steps = None, 0
    for token in stream_constrained(model, x, max_new_tokens, constraint, eos_token_id=eos):
        first = first or time.perf_counter()
        steps += 1
        if int(token[0]) in eos:
            break
        out.append(int(token[0]))
    end = time.perf_counter()
    first = first or end
    return Answer(tokenizer.decode(out, skip_special_tokens=True), steps, first - start,
                  end - first, len(out) < steps)


def open_llamacpp(name: str, folder: str | Path, *, threads: int) -> tuple[Any, str | None]:
    """(a llama.cpp server for this model, None) or (None, why llama.cpp cannot run it here)."""
    import importlib.util

    if importlib.util.find_spec("xllamacpp") is None:
        return None, "xllamacpp is not installed (pip install xllamacpp)"
    gguf = gguf_for(name, folder)
    if gguf is None:
        return None, f"no GGUF for {name}: put one (*.gguf) in its folder {folder}"
    return llamacpp_server(gguf, threads=threads), None


def llamacpp_server(gguf: Path, *, threads: int, n_ctx: int = 4096) -> Any:
    """xllamacpp's in-process llama.cpp server on one GGUF (no HTTP: requests are dicts). Used
    directly by this study; the lab's llama.cpp runtime adapters live in labkit.runtimes."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.warmup = False
    params.verbosity = -1  # errors only: llama.cpp's per-request timing lines would fill the notebook
    return xllamacpp.Server(params)


def llamacpp_grammar(schema: dict[str, Any]) -> str:
    """llama.cpp's grammar for a schema, with the same compact-JSON options as the torch path
    (read by llguidance when llama.cpp is built with it; a GBNF grammar otherwise)."""
    import xllamacpp

    from labkit.inference.constrained import COMPACT_JSON

    return xllamacpp.json_schema_to_grammar({**schema, "x-guidance": COMPACT_JSON})


def generate_llamacpp(server: Any, ids: list[int], max_new_tokens: int,
                      schema: dict[str, Any] | None = None) -> Answer:
    """Greedy answer from llama.cpp on the same prompt ids; times are llama.cpp's own (prompt
    evaluation, then generation), the prompt never taken from its cache."""
    request: dict[str, Any] = {"prompt": list(ids), "n_predict": max_new_tokens, "temperature": 0.0,
                               "top_k": 1, "cache_prompt": False}
    if schema is not None:
        request["grammar"] = llamacpp_grammar(schema)
    reply = server.handle_completions(request)
    if "choices" not in reply:
        raise RuntimeError(f"llama.cpp refused the request: {reply}")
    timings, choice = reply["timings"], reply["choices"][0]
    return Answer(choice["text"], int(timings["predicted_n"]), timings["prompt_ms"] / 1e3,
                  timings["predicted_ms"] / 1e3, choice["finish_reason"] == "stop")


def gguf_for(name: str, folder: str | Path) -> Path | None:
    """The GGUF llama.cpp runs for a model: the embedded model's own file, else a ``*.gguf`` in
    its folder (None: llama.cpp is skipped, with that reason)."""
    from labkit.models import embedded

    if name in embedded.EMBEDDED:
        return embedded.gguf_path(embedded.EMBEDDED[name])
    found = sorted(Path(folder).glob("*.gguf"))
    return found[0] if found else None


def reference_tokens(tokenizer: Any, item: Item) -> int:
    """Tokens of the item's reference answer (its first possible values, required parameters
    only, as a JSON list) plus the end token; 0 for irrelevance (no call is the answer)."""
    if item.answer is None:
        return 0
    calls = [{"name": next(iter(e)), "arguments": _first_values(e, optional=False)} for e in item.answer]
    return len(tokenizer(json.dumps(calls))["input_ids"]) + 1


def token_budget(tokenizer: Any, item: Item, *, factor: float, minimum: int) -> int:
    """max_new_tokens for one item: ``factor`` times its reference answer, at least ``minimum``
    (a parallel answer needs three times the tokens of a simple one)."""
    return max(positive_int(minimum, "minimum", "token_budget"),
               math.ceil(factor * reference_tokens(tokenizer, item)))


class Harness:
    """Answers one item by one method: the prompt ids and the token budget built once per item."""

    def __init__(self, model: Any, tokenizer: Any, *, budget_factor: float, min_new_tokens: int,
                 server: Any = None) -> None:
        self.model, self.tokenizer, self.server = model, tokenizer, server
        self.factor, self.minimum = float(budget_factor), positive_int(min_new_tokens, "min_new_tokens")
        self._ids: dict[tuple[str, str], list[int]] = {}

    def max_new_tokens(self, item: Item) -> int:
        return token_budget(self.tokenizer, item, factor=self.factor, minimum=self.minimum)

    def ids(self, item: Item, fmt: str) -> list[int]:
        key = (item.id, fmt)
        if key not in self._ids:
            self._ids[key] = prompt_ids(self.tokenizer, item, fmt)
        return self._ids[key]

    def answer(self, method: Method, item: Item) -> Answer:
        ids = self.ids(item, method.fmt)
        schema = calls_schema(item.functions) if method.constrained else None
        budget = self.max_new_tokens(item)
        if method.engine == "llama.cpp":
            return generate_llamacpp(self.server, ids, budget, schema)
        return generate_torch(self.model, self.tokenizer, ids, budget, schema)


def answer_row(item: Item, method: Method, prompt_tokens: int, answer: Answer, wall_s: float) -> dict[str, Any]:
    parsed = parse_calls(answer.text)
    verdict = check(item, parsed)
    return dict(item=item.id, category=item.category, method=method.name, engine=method.engine,
                fmt=method.fmt, constrained=method.constrained, prompt_tokens=prompt_tokens,
                wall_s=wall_s, tokens=answer.tokens, ttft_ms=answer.ttft_s * 1e3, decode_tok_s=answer.decode_tokens_per_s,
                stopped=answer.stopped, valid_json=parsed.valid_json, called=parsed.called,
                ok=verdict.ok, error=verdict.error, text=answer.text)


def run_items(harness: Harness, items: Sequence[Item], how: Sequence[Method],
              progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Every item by every method, item after item (the methods interleaved, never one whole
    method after another), one row per answer."""
    rows = []
    for i, item in enumerate(items):
        for method in how:
            start = time.perf_counter()
            answer = harness.answer(method, item)
            rows.append(answer_row(item, method, len(harness.ids(item, method.fmt)), answer,
                                   time.perf_counter() - start))
        if progress is not None and (i + 1 == len(items) or items[i + 1].category != item.category):
            progress(f"{item.category}: done ({i + 1}/{len(items)} items)")
    return pd.DataFrame(rows)


def save_answers(df: pd.DataFrame, name: str = "answers.jsonl") -> Path:
    """Every answer of this run (text included) as JSON lines, beside the results
    (``<output root>/data/function_calling/``): what the opt-in BFCL check also scores."""
    path = paths.output_root() / "data" / "function_calling" / name
    lines = [json.dumps(row, default=float) for row in df.to_dict(orient="records")]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# --- what the numbers are ----------------------------------------------------------------------


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per method and category: items, AST accuracy, valid-JSON rate, no-call rate (for
    irrelevance: detection), median TTFT, mean tokens generated, median decode tokens/s."""
    g = df.groupby(["method", "category"], sort=False)
    out = g.agg(items=("ok", "size"), ast_accuracy=("ok", "mean"), valid_json=("valid_json", "mean"),
                called=("called", "mean"), ttft_ms=("ttft_ms", "median"), tokens=("tokens", "mean"),
                decode_tok_s=("decode_tok_s", "median"))
    out.insert(3, "no_call", 1.0 - out.pop("called"))
    return out


def full_set_estimate(df: pd.DataFrame) -> pd.DataFrame:
    """What every item of each category would take here, from this run's own wall time per
    item (all methods of an item together) times the category's size in BFCL."""
    per_item = df.groupby(["category", "item"], sort=False).wall_s.sum().groupby("category", sort=False)
    out = pd.DataFrame({"items_run": per_item.size(), "s_per_item": per_item.mean()})
    out["items_in_bfcl"] = [len(load_category(c)) for c in out.index]
    out["full_set_min"] = out.s_per_item * out.items_in_bfcl / 60
    return out


def machine_load() -> str:
    """The load a timing was taken under: a shared box runs everything slower."""
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"load average {load:.1f} on {os.cpu_count()} logical cores"


def accuracy_table(summary: pd.DataFrame) -> pd.DataFrame:
    """AST accuracy (%), methods as rows, categories as columns, with the overall mean."""
    table = summary.ast_accuracy.unstack("category") * 100
    table = table[[c for c in CATEGORIES if c in table.columns]]
    table["mean"] = table.mean(axis=1)
    return table


def constraint_cost(df: pd.DataFrame) -> pd.DataFrame:
    """Per engine: decode tokens/s free and constrained on the same items (medians), and the
    median of the per-item ratio constrained / free (paired: the two ran back to back)."""
    rows = []
    for engine, part in df.groupby("engine", sort=False):
        fmt = part[part.constrained].fmt.unique()
        if len(fmt) == 0:
            continue
        same = part[part.fmt == fmt[0]]
        free = same[~same.constrained].set_index("item").decode_tok_s
        cons = same[same.constrained].set_index("item").decode_tok_s
        ratio = (cons / free).replace([np.inf, -np.inf], np.nan).dropna()
        rows.append(dict(engine=engine, fmt=fmt[0], pairs=len(ratio), free_tok_s=free.median(),
                         constrained_tok_s=cons.median(), ratio=ratio.median(),
                         free_tokens=same[~same.constrained].tokens.mean(),
                         constrained_tokens=same[same.constrained].tokens.mean()))
    return pd.DataFrame(rows).set_index("engine")


def result_records(summary: pd.DataFrame, cost: pd.DataFrame, *, device: str, model: str,
                   params: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per measured value: each method and category, then the constraint's cost."""
    units = dict(ast_accuracy=("ast_accuracy", "fraction"), valid_json=("valid_json_rate", "fraction"),
                 no_call=("no_call_rate", "fraction"), ttft_ms=("ttft_ms", "ms"),
                 tokens=("tokens_generated", "tokens"), decode_tok_s=("decode_tokens_per_s", "tokens/s"))
    recs = []
    for (method, category), row in summary.iterrows():
        engine, fmt, mode = [s.strip() for s in method.split("·")]
        where = dict(runtime=engine, device=device if engine == "torch" else "cpu", model=model,
                     params={**params, "category": category, "format": fmt, "decoding": mode,
                             "items": int(row["items"])})
        recs += [dict(study=STUDY, metric=name, value=float(row[col]), unit=unit, **where)
                 for col, (name, unit) in units.items() if math.isfinite(float(row[col]))]
    for engine, row in cost.iterrows():
        if math.isfinite(row.ratio):
            recs.append(dict(study=STUDY, metric="constrained_over_free_tok_s", value=float(row.ratio),
                             unit="ratio", runtime=engine, device=device if engine == "torch" else "cpu",
                             model=model, params={**params, "format": row.fmt, "pairs": int(row.pairs)}))
    return recs


def error_counts(df: pd.DataFrame) -> pd.DataFrame:
    """How the wrong answers failed, per method (BFCL's first failing check)."""
    wrong = df[~df.ok]
    if wrong.empty:
        return pd.DataFrame(index=pd.Index([], name="method"))
    return wrong.groupby(["method", "error"]).size().unstack("error", fill_value=0)


def examples(df: pd.DataFrame, method: str, n: int = 1) -> pd.DataFrame:
    """The first ``n`` answers of each category by one method, text shortened."""
    part = df[df.method == method].groupby("category", sort=False).head(n)
    return part[["category", "item", "ok", "error", "text"]].assign(text=part.text.str.slice(0, 160))


# --- the published reference -------------------------------------------------------------------

#: xLAM-1b-fc-r on BFCL, as published. BFCL's "Simple" averages its Python, Java and JavaScript
#: simple categories (this study runs simple_python only); all are non-live AST accuracy, FC mode.
XLAM_REFERENCE = {
    "model": "Salesforce/xLAM-1b-fc-r (FC)",
    "source": ("Patil et al., The Berkeley Function Calling Leaderboard (BFCL): From Tool Use to "
               "Agentic Evaluation of Large Language Models, ICML 2025, PMLR 267:48371-48392, "
               "Table 1 (single-turn AST and hallucination columns)"),
    "url": "https://proceedings.mlr.press/v267/patil25a.html",
    "date": "2025-07-13",
    "accuracy_pct": {"simple_python": 71.7, "multiple": 86.0, "parallel": 5.0,
                     "parallel_multiple": 2.0, "irrelevance": 6.7},
    "caveat": "its simple column averages simple Python, Java and JavaScript",
}


def reference_row(categories: Sequence[str]) -> pd.Series:
    values = XLAM_REFERENCE["accuracy_pct"]
    return pd.Series({c: values[c] for c in categories if c in values},
                     name=f"{XLAM_REFERENCE['model']}, published")


def describe_reference() -> str:
    r = XLAM_REFERENCE
    return f"{r['model']}: {r['source']}; {r['url']} (published {r['date']}); note: {r['caveat']}"


# --- figures -----------------------------------------------------------------------------------


def plot_accuracy(table: pd.DataFrame, reference: pd.Series, *, model_name: str, n_items: dict) -> Any:
    """AST accuracy per category: one bar per method, the published xLAM-1b-fc-r hatched."""
    from labkit.core.plotting import new_figure

    cats = [c for c in CATEGORIES if c in table.columns]
    rows = [(name, table.loc[name, cats].to_numpy(float), {}) for name in table.index]
    rows.append((reference.name, np.array([reference.get(c, np.nan) for c in cats]),
                 dict(hatch="//", color="white", edgecolor="0.3")))
    fig, ax = new_figure(figsize=(10, 5))
    width = 0.8 / len(rows)
    for i, (label, values, style) in enumerate(rows):
        ax.bar(np.arange(len(cats)) + (i - (len(rows) - 1) / 2) * width, values, width, label=label, **style)
    ax.set_xticks(np.arange(len(cats)), [f"{c}\n({n_items.get(c, 0)} items)" for c in cats])
    ax.set_xlabel("BFCL category (items run)")
    ax.set_ylabel("AST accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{model_name} on BFCL: AST accuracy by category and decoding")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: no bar hidden
    return fig


def plot_constraint_cost(df: pd.DataFrame, cost: pd.DataFrame, *, model_name: str) -> Any:
    """Decode tokens/s of every answer, free against constrained, per engine (paired items)."""
    from labkit.core.plotting import new_figure

    fig, axes = new_figure(1, len(cost), figsize=(max(6.5, 4.5 * len(cost)), 3.8), squeeze=False)
    for ax, (engine, row) in zip(axes[0], cost.iterrows(), strict=True):
        same = df[(df.engine == engine) & (df.fmt == row.fmt)]
        free = same[~same.constrained].set_index("item").decode_tok_s
        cons = same[same.constrained].set_index("item").decode_tok_s.reindex(free.index)
        ax.scatter(free, cons, s=12, alpha=0.7)
        top = float(np.nanmax([free.max(), cons.max()])) * 1.1
        ax.plot([0, top], [0, top], color="0.5", lw=1, label="equal speed")
        ax.set_xlabel("free decoding (tokens/s)")
        ax.set_ylabel("constrained (tokens/s)")
        ax.set_title(f"{engine}: median ratio {row.ratio:.2f} ({int(row.pairs)} items)")
        ax.legend(fontsize=8)
    fig.suptitle(f"What a JSON-schema constraint costs in decode speed\n({model_name})")
    return fig


# --- the agreement with BFCL's own checker -----------------------------------------------------

AGREEMENT_FILE = paths.data_dir() / "function_calling" / "bfcl_agreement.json"
BFCL_VENV = paths.root() / "build" / "venvs" / "bfcl"


def read_agreement(path: Path = AGREEMENT_FILE) -> dict[str, Any] | None:
    """The last recorded comparison of labkit's scorer with BFCL's, or None."""
    return json.loads(path.read_text()) if path.is_file() else None


def describe_agreement(record: dict[str, Any] | None) -> str:
    """One paragraph: whether the opt-in check has run, and what it found in its last run."""
    if record is None:
        return ("The comparison with BFCL's own checker has never run in this checkout: it is an opt-in "
                "test (LABKIT_TEST_BFCL=1 pytest tests/test_study_function_calling.py) that installs "
                "the full bfcl-eval in its own venv. Until then labkit's scores rest on the unit tests.")
    run = record["run"]
    return (f"Last recorded run of the opt-in check: {run['date']} on machine {run['machine']} "
            f"(labkit at {run['git_rev']}, bfcl-eval {run['bfcl_version']} in its own venv). "
            f"labkit's parser and AST check agree with BFCL's on {record['agree']} of "
            f"{record['cases']} answers ({100 * record['agree'] / record['cases']:.2f}%) over every item of "
            f"{', '.join(record['categories'])}; {len(record['disagreements'])} disagreement(s) listed in "
            f"{AGREEMENT_FILE.relative_to(paths.data_dir().parent)}.")


def agreement_table(record: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(record["per_category"]).T[["items", "cases", "agree"]]


def _concrete(value: Any) -> Any:
    """A possible answer as a value: a dict's possible answers are ``{key: [values]}`` (and a
    list of dicts, a list of those), so take each key's first value."""
    if isinstance(value, dict):
        return {k: _concrete(next(x for x in v if x != "")) for k, v in value.items()
                if isinstance(v, list) and any(x != "" for x in v)}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_concrete(v) for v in value]
    return value


def _first_values(expected: dict[str, Any], *, optional: bool) -> dict[str, Any]:
    """Arguments from the first possible value of each parameter (optional ones, whose values
    include "", kept only when ``optional``)."""
    params = next(iter(expected.values()))
    out = {}
    for p, values in params.items():
        concrete = [v for v in values if v != ""]
        if concrete and (optional or "" not in values):
            out[p] = _concrete(concrete[0])
    return out


def _wrong_value(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1000
    if isinstance(value, str):
        return value + " qzx"
    if isinstance(value, list):
        return [*value, value[0]] if value else ["qzx"]
    return {"qzx": 1}


def _variants(item: Item) -> dict[str, Any]:
    """Answers to one item, right and wrong in the ways BFCL's rules distinguish (as values that
    become JSON text): the two scorers must agree on each."""
    fn = item.functions[0]
    if item.answer is None:  # irrelevance: a refusal, an empty list, a call
        call = {"name": fn["name"], "arguments": {p: "x" for p in fn["parameters"].get("required", [])}}
        return {"empty": [], "call": [call], "refusal": "None of these tools can do that.",
                "bad_arguments": [{"name": fn["name"], "arguments": "x"}], "wrapped": {"tool_calls": []}}
    calls = [{"name": next(iter(e)), "arguments": _first_values(e, optional=True)} for e in item.answer]
    short = [{"name": next(iter(e)), "arguments": _first_values(e, optional=False)} for e in item.answer]
    first = calls[0]["arguments"]
    key = next(iter(first), None)
    out: dict[str, Any] = {"right": calls, "required_only": short, "reversed": calls[::-1],
                           "wrong_name": [{**calls[0], "name": calls[0]["name"] + "_v2"}, *calls[1:]],
                           "extra_call": [*calls, calls[0]], "one_fewer": calls[:-1],
                           "extra_param": [{**calls[0], "arguments": {**first, "qzx": 1}}, *calls[1:]],
                           "not_json": json.dumps(calls)[:-2], "refusal": "I cannot help with that."}
    if key is not None:
        value = first[key]
        changes = {"wrong_value": _wrong_value(value), "missing_param": None,
                   "as_string": value if isinstance(value, str) else json.dumps(value),
                   "string_case": value.upper() + " ." if isinstance(value, str) else value,
                   "int_for_float": int(value) if isinstance(value, float) and value.is_integer() else value}
        for label, new in changes.items():
            args = {k: v for k, v in first.items() if k != key} if label == "missing_param" else {**first, key: new}
            out[label] = [{**calls[0], "arguments": args}, *calls[1:]]
    return out


def agreement_cases(items: Sequence[Item], answers: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """Answers for the two scorers to judge: :func:`_variants` of every item, plus a run's real
    answers (``answers``: rows of :func:`run_items`) where given."""
    by_id = {it.id: it for it in items}
    cases = []
    for item in items:
        for label, value in _variants(item).items():
            text = value if isinstance(value, str) else json.dumps(value)
            cases.append(dict(id=item.id, category=item.category, label=label, text=text))
    if answers is not None:
        for row in answers.itertuples():
            if row.item in by_id:
                cases.append(dict(id=row.item, category=row.category, label=f"model:{row.method}", text=row.text))
    return cases


#: runs in BFCL's own venv: its xLAM-2 decoder (a JSON list of {"name", "arguments"}) and its AST
#: checker, through the same entry points its eval_runner uses, one JSON verdict per line
BFCL_WORKER = r"""
import json, sys
from bfcl_eval.constants.enums import Language, ReturnFormat
from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
from bfcl_eval.model_handler.local_inference.salesforce_llama import SalesforceLlamaHandler
from bfcl_eval.utils import is_empty_output, is_function_calling_format_output
MODEL = "Salesforce_Llama-xLAM-2-8b-fc-r"  # underscore_to_dot False: names are compared as written
for line in sys.stdin:
    case = json.loads(line)
    try:
        decoded, ok_decode = SalesforceLlamaHandler.decode_ast(None, case["text"], ReturnFormat.PYTHON, False), True
    except Exception:
        decoded, ok_decode = None, False
    try:
        if case["category"] == "irrelevance":
            ok = (not ok_decode) or is_empty_output(decoded)
        elif not ok_decode or not is_function_calling_format_output(decoded):
            ok = False
        else:
            ok = ast_checker(case["functions"], decoded, case["answer"], Language.PYTHON,
                             case["category"], MODEL)["valid"]
        print(json.dumps({"ok": bool(ok)}))
    except Exception as exc:
        print(json.dumps({"ok": None, "crash": f"{type(exc).__name__}: {exc}"}))
"""


def ensure_bfcl_venv(venv: Path = BFCL_VENV) -> list[str]:
    """Create BFCL's own venv with the full bfcl-eval, if missing; return the commands run.
    ``soundfile`` is added by hand: bfcl-eval imports qwen_agent, which imports it undeclared."""
    python = venv / "bin" / "python"
    commands = [[sys.executable, "-m", "venv", str(venv)],
                [str(python), "-m", "pip", "install", "-q", f"bfcl-eval=={BFCL_VERSION}", "soundfile"]]
    if python.exists():
        return []
    for cmd in commands:
        subprocess.run(cmd, check=True, timeout=3600)
    return [" ".join(c) for c in commands]


def bfcl_verdicts(cases: Sequence[dict[str, Any]], items: Sequence[Item], venv: Path = BFCL_VENV) -> list[dict]:
    """BFCL's own verdict on each case (``{"ok": bool}``, or ``{"ok": None, "crash": ...}``)."""
    by_id = {it.id: it for it in items}
    lines = [json.dumps({**c, "functions": by_id[c["id"]].functions, "answer": by_id[c["id"]].answer})
             for c in cases]
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", BFCL_WORKER], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"BFCL's checker failed in {venv}: {proc.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def compare_scorers(cases: Sequence[dict[str, Any]], items: Sequence[Item],
                    theirs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The agreement record: counts per category, and every case the two judge differently."""
    if len(theirs) != len(cases):
        raise ValueError(f"{len(theirs)} BFCL verdicts for {len(cases)} cases")
    by_id = {it.id: it for it in items}
    per: dict[str, dict[str, int]] = {}
    disagreements = []
    for case, their in zip(cases, theirs, strict=True):
        ours = check(by_id[case["id"]], parse_calls(case["text"])).ok
        stats = per.setdefault(case["category"], {"items": 0, "cases": 0, "agree": 0})
        stats["cases"] += 1
        stats["agree"] += int(ours == their["ok"])
        if ours != their["ok"]:
            disagreements.append({**case, "labkit": ours, "bfcl": their["ok"], "bfcl_crash": their.get("crash")})
    for c in per:
        per[c]["items"] = sum(1 for it in items if it.category == c)
    return dict(cases=len(cases), agree=sum(p["agree"] for p in per.values()), categories=list(per),
                per_category=per, disagreements=disagreements)


def write_agreement(record: dict[str, Any], path: Path = AGREEMENT_FILE) -> Path:
    """Stamp the record with its run (date, machine, labkit revision, bfcl-eval version) and
    write it atomically."""
    from datetime import datetime, timezone

    from labkit.core import env
    from labkit.core.results import _git_rev

    run = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=env.machine_id(),
               git_rev=_git_rev(), bfcl_version=BFCL_VERSION, venv=str(BFCL_VENV.relative_to(paths.root())))
    return atomic_write_json(path, {"run": run, **record})
