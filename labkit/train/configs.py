"""Named training configurations: the model's shape and the optimizer's schedule, in one place.

"quick" trains on a laptop CPU in a few minutes (``make model-quick``); it shows every code path
and is not the shipped model. "shipped" is the model in ``data/models/tiny-llama``, trained on
one GPU under a wall-clock budget. "tiny" is for tests (seconds).

Shipped shape, and why: hidden 512 with head_dim 64 (8 query heads, 2 KV heads: GQA 4:1),
SwiGLU width 1408 = 22 * 64 (about 8/3 * 512, rounded up to a multiple of 64), 8 layers, tied
input/output embeddings (8192 * 512 = 4.2 M weights once, not twice): 26.7 M parameters. Every
weight dimension (8192, 512, 128, 1408) is a multiple of 64, so block-wise quantization with
blocks of 32, 64 or 128 applies to every layer. Context 1024 (>= 512). About 330 M tokens fit
the GPU budget, ~12 tokens per parameter: the model is sized to the compute, and dropout plus
weight decay guard against the ~10 passes over a 33 M-token corpus.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class ModelShape:
    """The LlamaConfig fields we choose (the rest come from the tokenizer)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run besides the data."""

    name: str
    model: ModelShape
    seq_len: int
    batch_size: int
    max_steps: int
    lr: float
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dropout: float = 0.0  # on the attention and MLP outputs before the residual add
    eval_every: int = 100
    eval_max_windows: int | None = None  # None: the whole held-out split
    seed: int = 1337
    compile: bool = True  # torch.compile on CUDA only
    time_budget_s: float | None = None  # wall-clock stop; the schedule shrinks to fit it
    calibrate_steps: int = 30  # steps timed (after warm-up) to fit max_steps into the budget
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(
        name="tiny",
        model=ModelShape(64, 128, 2, 2, 1, 64),
        seq_len=32,
        batch_size=4,
        max_steps=8,
        lr=3e-3,
        warmup_steps=2,
        eval_every=4,
        eval_max_windows=8,
        compile=False,
    ),
    "quick": TrainConfig(
        name="quick",
        model=ModelShape(128, 384, 2, 2, 1, 256),
        seq_len=256,
        batch_size=16,
        max_steps=600,
        lr=3e-3,
        warmup_steps=30,
        eval_every=100,
        eval_max_windows=64,
        time_budget_s=180.0,
        compile=False,
    ),
    "shipped": TrainConfig(
        name="shipped",
        model=ModelShape(512, 1408, 8, 8, 2, 1024),
        seq_len=1024,
        batch_size=64,
        max_steps=6000,
        lr=1.5e-3,
        warmup_steps=200,
        dropout=0.1,
        eval_every=250,
        time_budget_s=470.0,
    ),
}


def get(name: str, **overrides) -> TrainConfig:
    """A named config, with fields replaced by ``overrides`` (None values are ignored)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown training config {name!r}; choose one of {sorted(CONFIGS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(CONFIGS[name], **changes)
