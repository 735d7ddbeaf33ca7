"""The training loop of the embedded decoder, and the writer of its Hugging Face folder.

Deterministic for a seed: the weights come from ``torch.manual_seed(seed)``, the data order from
a ``torch.Generator`` seeded per epoch, so two runs on the same device and library versions see
the same batches and (on CPU) produce identical losses. AdamW with weight decay on matrices only,
linear warm-up then cosine decay, gradient clipping, bf16 autocast and ``torch.compile`` on CUDA.
The held-out split is evaluated periodically and the checkpoint with the BEST HELD-OUT loss is
the one written (not the last, not the best on train).

Data format: one uint16 stream per split of ``<|bos|> document <|eos|>`` (see prepare.py).
Training windows are ``seq_len + 1`` tokens; targets equal to ``<|bos|>`` are not scored (the
token after ``<|eos|>`` is always ``<|bos|>``: free points that say nothing about Python).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from labkit.core import files
from labkit.train import tokenizer as tok_mod
from labkit.train.configs import TrainConfig

IGNORE = -100
STORAGE_DTYPE = torch.float16


# --- model -----------------------------------------------------------------------------------


def llama_config(cfg: TrainConfig, vocab_size: int):
    """The LlamaConfig of a training config (ids of the special tokens from the tokenizer)."""
    from labkit.models.config import LlamaConfig

    return LlamaConfig(  # ModelShape's fields are LlamaConfig's, by name
        vocab_size=vocab_size, **asdict(cfg.model), bos_token_id=tok_mod.BOS_ID,
        eos_token_id=tok_mod.EOS_ID, torch_dtype=str(STORAGE_DTYPE).removeprefix("torch."),
    )


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """A freshly initialized labkit Llama, drawn from ``torch.manual_seed(cfg.seed)``."""
    from labkit.models.llama import Llama

    torch.manual_seed(cfg.seed)
    model = Llama(llama_config(cfg, vocab_size))
    if cfg.dropout > 0:
        add_residual_dropout(model, cfg.dropout)
    return model


def add_residual_dropout(model: torch.nn.Module, p: float) -> None:
    """Dropout on each attention and MLP output before it joins the residual stream.

    Done with forward hooks so the module tree and state-dict keys stay exactly transformers'
    (the shipped folder carries no trace of it); inactive in ``model.eval()``.
    """

    def hook(module: torch.nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p=p, training=module.training)

    for block in model.model.layers:
        block.self_attn.register_forward_hook(hook)
        block.mlp.register_forward_hook(hook)


# --- data ------------------------------------------------------------------------------------


def heldout_windows(
    stream: np.ndarray, seq_len: int, max_windows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (inputs, targets) windows over a stream; BOS targets masked to IGNORE.

    With ``max_windows`` the windows are spread evenly over the stream, not its first files.
    """
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"held-out stream of {len(stream)} tokens is shorter than seq_len + 1")
    idx = np.arange(n)
    if max_windows is not None and max_windows < n:
        idx = np.linspace(0, n - 1, max_windows).round().astype(np.int64)
    starts = idx * seq_len
    win = np.stack([stream[s : s + seq_len + 1].astype(np.int64) for s in starts])
    x = torch.from_numpy(win[:, :-1].copy())
    y = torch.from_numpy(win[:, 1:].copy())
    y[y == tok_mod.BOS_ID] = IGNORE
    return x, y


@dataclass
class Batches:
    """Epochs of shuffled, non-overlapping training windows (a random offset per epoch)."""

    stream: torch.Tensor  # int64 on the training device
    seq_len: int
    batch_size: int
    seed: int
    epoch: int = 0
    _order: torch.Tensor | None = None
    _pos: int = 0
    _starts: torch.Tensor | None = field(default=None, repr=False)

    def _new_epoch(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        offset = int(torch.randint(0, self.seq_len, (1,), generator=g))
        n = (len(self.stream) - offset - 1) // self.seq_len
        if n < self.batch_size:
            raise ValueError(
                f"training stream of {len(self.stream)} tokens holds {n} windows of "
                f"{self.seq_len + 1}, fewer than one batch of {self.batch_size}"
            )
        self._starts = offset + torch.arange(n) * self.seq_len
        self._order = torch.randperm(n, generator=g)
        self._pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._order is None or self._pos + self.batch_size > len(self._order):
            if self._order is not None:
                self.epoch += 1
            self._new_epoch()
        assert self._order is not None and self._starts is not None
        pick = self._starts[self._order[self._pos : self._pos + self.batch_size]]
        self._pos += self.batch_size
        idx = pick.to(self.stream.device)[:, None] + torch.arange(
            self.seq_len + 1, device=self.stream.device
        )
        win = self.stream[idx]
        x, y = win[:, :-1], win[:, 1:].clone()
        y[y == tok_mod.BOS_ID] = IGNORE
        return x, y


# --- metrics ---------------------------------------------------------------------------------


def unigram_baseline(train: np.ndarray, targets: torch.Tensor, vocab_size: int) -> dict:
    """Perplexity of add-one-smoothed train token frequencies on the scored held-out targets."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64)
    counts[tok_mod.BOS_ID] = 0.0  # BOS is never a scored target; keep the comparison fair
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    y = targets[targets != IGNORE].numpy()
    loss = float(-logp[y].mean())
    return {"loss": loss, "ppl": math.exp(loss), "targets": int(y.size)}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    batch_size: int,
    autocast: bool,
) -> dict:
    """Mean next-token cross-entropy (nats) over every scored target in (x, y)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(xb)
        nll = F.cross_entropy(
            logits.float().flatten(0, 1), yb.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        total += float(nll)
        count += int((yb != IGNORE).sum())
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "targets": count}


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; weight decay on matrices (embeddings and projections), none on norm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if present, else cpu (MPS is not used for training: no bf16 autocast)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the loop --------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: torch.nn.Module  # holding the best-held-out weights
    log: dict
    losses: list[float]  # train loss of every step


@dataclass
class _Run:
    """The state of one training run: model, optimiser, data, and what has been measured."""

    cfg: TrainConfig
    dev: torch.device
    model: torch.nn.Module
    step_model: torch.nn.Module  # the model, or its torch.compile wrapper
    compiled: bool
    opt: torch.optim.Optimizer
    batches: Batches
    hx: torch.Tensor  # held-out windows (inputs, targets)
    hy: torch.Tensor
    t_start: float
    total_steps: int  # planned steps: max_steps, or fewer once fitted to a time budget
    calib_start: int  # steps left out of the steady timing (warm-up; compilation on CUDA)
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"loss": float("inf")})
    best_state: dict[str, torch.Tensor] | None = None
    eval_seconds: float = 0.0
    step_seconds_total: float = 0.0
    timed_steps: int = 0
    calib_t0: float | None = None

    @property
    def on_cuda(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len


def _start_run(
    cfg: TrainConfig,
    train_tokens: np.ndarray,
    heldout_tokens: np.ndarray,
    vocab_size: int,
    device: str,
    t_start: float,
) -> _Run:
    """Model, optimiser (and torch.compile on CUDA), batches and held-out windows of a run."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, vocab_size).to(dev)
    opt = make_optimizer(model, cfg, dev)
    compiled = bool(cfg.compile and dev.type == "cuda")
    batches = Batches(
        torch.from_numpy(train_tokens.astype(np.int64)).to(dev),
        cfg.seq_len,
        cfg.batch_size,
        cfg.seed,
    )
    hx, hy = heldout_windows(heldout_tokens, cfg.seq_len, cfg.eval_max_windows)
    return _Run(
        cfg=cfg,
        dev=dev,
        model=model,
        step_model=torch.compile(model) if compiled else model,
        compiled=compiled,
        opt=opt,
        batches=batches,
        hx=hx,
        hy=hy,
        t_start=t_start,
        total_steps=cfg.max_steps,
        calib_start=5 if compiled else 2,
    )


def _train_step(run: _Run, step: int, say: Callable[[str], None]) -> float:
    """One optimiser step at ``step`` (0-based): lr, batch, loss, clipped gradients. Returns
    the lr; the loss goes to ``run.losses``, the step's time to the steady timing."""
    cfg = run.cfg
    lr = lr_at(step, run.total_steps, cfg)
    for group in run.opt.param_groups:
        group["lr"] = lr
    x, y = run.batches.next()
    t0 = time.perf_counter()
    try:
        loss = _forward_backward(run.step_model, x, y, run.opt, run.dev, run.on_cuda)
    except Exception as exc:  # torch.compile failing on this machine: train eagerly
        if run.step_model is run.model:
            raise
        say(f"torch.compile failed ({type(exc).__name__}: {exc}); continuing eagerly")
        run.step_model, run.compiled = run.model, False
        loss = _forward_backward(run.step_model, x, y, run.opt, run.dev, run.on_cuda)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.opt.step()
    run.losses.append(float(loss.detach()))  # syncs: the step is done when this returns
    if step + 1 > run.calib_start:
        run.step_seconds_total += time.perf_counter() - t0
        run.timed_steps += 1
    return lr


def _evaluate_checkpoint(run: _Run, step: int, say: Callable[[str], None]) -> None:
    """Held-out loss after ``step`` steps, logged; the weights are kept when it is the best."""
    cfg = run.cfg
    _sync(run.dev)
    t0 = time.perf_counter()
    res = evaluate(run.model, run.hx, run.hy, run.dev, max(1, cfg.batch_size), autocast=run.on_cuda)
    _sync(run.dev)
    run.eval_seconds += time.perf_counter() - t0
    recent = run.losses[-cfg.eval_every :]
    rec = {
        "step": step,
        "tokens_seen": step * run.tokens_per_step,
        "train_loss": float(np.mean(recent)) if recent else None,
        "heldout_loss": res["loss"],
        "heldout_ppl": res["ppl"],
        "lr": lr_at(max(0, step - 1), run.total_steps, cfg),
        "elapsed_s": time.perf_counter() - run.t_start,
    }
    run.evals.append(rec)
    if res["loss"] < run.best["loss"]:
        run.best = dict(rec, loss=res["loss"])
        run.best_state = {
            k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()
        }
    say(
        f"step {step:5d}/{run.total_steps} tokens {rec['tokens_seen']:,} "
        f"train {rec['train_loss'] if rec['train_loss'] is not None else float('nan'):.4f} "
        f"held-out {res['loss']:.4f} (ppl {res['ppl']:.2f}) best@{run.best['step']}"
    )


def _budget_spent(run: _Run, step: int, bar, say: Callable[[str], None]) -> bool:
    """With a time budget: once the steady step time is known, fit ``run.total_steps`` to the
    budget; True when the budget is spent before the planned steps are."""
    cfg = run.cfg
    if step == run.calib_start:
        run.calib_t0 = time.perf_counter()
    elif run.calib_t0 is not None and (
        step == run.calib_start + cfg.calibrate_steps
        # slow machine: calibrate on fewer steps rather than run out of budget first
        or (step >= run.calib_start + 3 and _elapsed(run.t_start) > 0.1 * cfg.time_budget_s)
    ):
        run.total_steps = _fit_steps_to_budget(
            cfg,
            step,
            (time.perf_counter() - run.calib_t0) / (step - run.calib_start),
            run.t_start,
            run.eval_seconds,
            len(run.evals),
        )
        run.calib_t0 = None
        say(f"calibrated: {run.total_steps} steps fit the {cfg.time_budget_s:.0f} s budget")
        if bar is not None:
            bar.total = run.total_steps
    if time.perf_counter() - run.t_start > cfg.time_budget_s and step < run.total_steps:
        say(f"time budget reached at step {step} (planned {run.total_steps})")
        return True
    return False


def _training_log(run: _Run, step: int, stopped_by: str, wall: float, train_tokens: int) -> dict:
    """training_log.json's content: config, machine, steps, throughput, every evaluation."""
    tps = run.tokens_per_step
    return {
        "config": run.cfg.to_dict(),
        "device": _device_name(run.dev),
        "torch": torch.__version__,
        "compiled": run.compiled,
        "num_parameters": run.model.num_parameters(),
        "steps": step,
        "planned_steps": run.total_steps,
        "stopped_by": stopped_by,
        "tokens_per_step": tps,
        "tokens_seen": step * tps,
        "epochs_seen": step * tps / train_tokens,
        "wall_seconds": wall,
        "eval_seconds": run.eval_seconds,
        "tokens_per_second_overall": step * tps / wall,
        "tokens_per_second_steady": (
            run.timed_steps * tps / run.step_seconds_total if run.step_seconds_total else None
        ),
        "best": run.best,
        "evals": run.evals,
        "train_loss_every_10": [
            float(np.mean(run.losses[i : i + 10])) for i in range(0, len(run.losses), 10)
        ],
    }


def train(
    cfg: TrainConfig,
    train_tokens: np.ndarray,
    heldout_tokens: np.ndarray,
    vocab_size: int,
    device: str = "auto",
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``cfg`` on the token streams; return the model with its best held-out weights.

    Evaluates at step 0, every ``cfg.eval_every`` steps and at the last step; with
    ``cfg.time_budget_s`` the planned steps are fitted to the budget after a few timed steps.
    """
    t_start = time.perf_counter()
    run = _start_run(cfg, train_tokens, heldout_tokens, vocab_size, device, t_start)
    bar = _progress(run.total_steps, progress)
    run.model.train()
    _evaluate_checkpoint(run, 0, say)
    step = 0
    stopped_by = "max_steps"
    while step < run.total_steps:
        lr = _train_step(run, step, say)
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}", lr=f"{lr:.2e}")
        if not math.isfinite(run.losses[-1]):
            raise FloatingPointError(f"training loss became {run.losses[-1]} at step {step}")
        if cfg.time_budget_s is not None and _budget_spent(run, step, bar, say):
            stopped_by = "time_budget"
            break
        if step % cfg.eval_every == 0 or step == run.total_steps:
            _evaluate_checkpoint(run, step, say)
    if run.evals[-1]["step"] != step:
        _evaluate_checkpoint(run, step, say)
    if bar is not None:
        bar.close()
    _sync(run.dev)
    wall = time.perf_counter() - t_start
    assert run.best_state is not None
    run.model.load_state_dict(run.best_state)
    log = _training_log(run, step, stopped_by, wall, len(train_tokens))
    return TrainResult(model=run.model, log=log, losses=run.losses)


def _forward_backward(
    step_model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    dev: torch.device,
    autocast: bool,
) -> torch.Tensor:
    """Loss of one batch, gradients left in .grad (bf16 autocast on CUDA)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        logits = step_model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    loss.backward()
    return loss


def _elapsed(t_start: float) -> float:
    return time.perf_counter() - t_start


def _fit_steps_to_budget(
    cfg: TrainConfig, step: int, step_s: float, t_start: float, eval_s: float, n_evals: int
) -> int:
    """The step count whose steps and evaluations end inside cfg.time_budget_s."""
    eval_each = eval_s / max(1, n_evals)
    remaining = cfg.time_budget_s - (time.perf_counter() - t_start)
    per_step = step_s + eval_each / cfg.eval_every
    fit = step + int(0.97 * remaining / per_step)
    return max(step + 1, min(cfg.max_steps, fit))


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the GPU machine may lack it; the eval lines still print
        return None
    return tqdm(total=total, mininterval=5.0, unit="step")


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


# --- final evaluation and the HF folder ---------------------------------------------------------


def storage_roundtrip(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as stored (fp16), and load those values back into ``model`` in fp32.

    Why fp16 storage: half the bytes of fp32 (the shipped file stays far under 100 MB and
    comes back from the GPU machine in few pieces), 3 more mantissa bits than bf16, and every
    target (Core ML, GGUF F16, ONNX) reads it. Loaders upcast; the metrics in the card are
    computed on these rounded weights, so they describe exactly the file that ships.
    """
    stored = {
        k: v.detach().to("cpu").to(STORAGE_DTYPE).contiguous()
        for k, v in model.state_dict().items()
    }
    for name, t in stored.items():
        if not torch.isfinite(t).all():
            raise FloatingPointError(f"weight {name} is not finite in {STORAGE_DTYPE}")
    model.load_state_dict({k: v.float() for k, v in stored.items()})
    return stored


def final_metrics(
    model: torch.nn.Module,
    cfg: TrainConfig,
    train_tokens: np.ndarray,
    heldout_tokens: np.ndarray,
    vocab_size: int,
    slice_windows: int,
    device: str = "auto",
) -> tuple[dict, np.ndarray]:
    """Held-out loss of the stored weights in fp32 (no autocast, no TF32), unigram, and a slice."""
    dev = resolve_device(device)
    model = model.to(dev).float()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        hx, hy = heldout_windows(heldout_tokens, cfg.seq_len, cfg.eval_max_windows)
        full = evaluate(model, hx, hy, dev, max(1, cfg.batch_size // 2), autocast=False)
        sx, sy = heldout_windows(heldout_tokens, cfg.seq_len, slice_windows)
        part = evaluate(model, sx, sy, dev, max(1, cfg.batch_size // 2), autocast=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    uni = unigram_baseline(train_tokens, hy, vocab_size)
    uni_slice = unigram_baseline(train_tokens, sy, vocab_size)
    n = (len(heldout_tokens) - 1) // cfg.seq_len
    slice_idx = np.linspace(0, n - 1, min(slice_windows, n)).round().astype(np.int64)
    slice_tokens = np.stack(
        [heldout_tokens[s * cfg.seq_len : s * cfg.seq_len + cfg.seq_len + 1] for s in slice_idx]
    ).astype(np.int32)
    metrics = {
        "weights": f"stored {str(STORAGE_DTYPE).removeprefix('torch.')}, evaluated in float32",
        "heldout": full,
        "heldout_windows": int(len(hx)),
        "unigram": uni,
        "ppl_ratio_unigram_over_model": uni["ppl"] / full["ppl"],
        "slice": {"windows": int(len(sx)), **part, "unigram": uni_slice},
        "eval_device": _device_name(dev),
    }
    return metrics, slice_tokens


def generation_config() -> dict:
    return {
        "bos_token_id": tok_mod.BOS_ID,
        "eos_token_id": tok_mod.EOS_ID,
        "pad_token_id": tok_mod.PAD_ID,
        "do_sample": False,
        "max_new_tokens": 128,
    }


def write_model_folder(
    out: Path,
    model_config,
    stored: dict[str, torch.Tensor],
    tokenizer_dir: Path,
    training_log: dict,
    slice_tokens: np.ndarray | None = None,
) -> Path:
    """Write the HF folder ``out`` as one atomic folder swap (labkit.core.files.atomic_dir):
    a reader sees the old folder or the complete new one, never a half-written mix."""
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    out = Path(out)
    with files.atomic_dir(out) as tmp:
        save_file(stored, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        training_log = dict(
            training_log, model_safetensors_sha256=files.sha256_file(tmp / "model.safetensors")
        )
        _write_json(tmp / "config.json", model_config.to_hf_dict())
        _write_json(tmp / "generation_config.json", generation_config())
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = Path(tokenizer_dir) / name
            if not src.is_file():
                raise FileNotFoundError(f"{src}: missing (expected the corpus' trained tokenizer)")
            shutil.copyfile(src, tmp / name)
        if slice_tokens is not None:
            save_np({"windows": slice_tokens}, str(tmp / "heldout_slice.safetensors"))
        _write_json(tmp / "training_log.json", training_log)
        for p in tmp.iterdir():
            p.chmod(files.FILE_MODE)
    return out


def _write_json(path: Path, obj: object) -> None:
    """JSON as the shipped folder has it (indent 2, trailing newline); inside an atomic_dir
    block, so a plain write: the folder swap makes the whole folder atomic."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
