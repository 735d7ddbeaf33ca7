"""labkit.models.sizes: the bytes a decode step reads are the bytes of the parameters it uses."""

from __future__ import annotations

import pytest
from conftest import decisive_llama as _model

from labkit.models.sizes import (
    weight_bytes_per_token,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_per_token_is_the_parameters_a_step_reads(tied):
    model = _model(tied=tied)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    # tied: the table is read whole as the output matrix; untied: only one row is gathered
    read = params + cfg.hidden_size if tied else params - embed + cfg.hidden_size
    assert weight_bytes_per_token(cfg, 4) == 4 * read
    assert weight_bytes_per_token(cfg.to_hf_dict(), 2) == 2 * read
