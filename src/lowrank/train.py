"""The training loop: ``train(model, train_data, eval_data, config) -> TrainResult``.

One optimizer step = ``grad_accum`` micro-batches. Their losses are summed per target (label token, or
example for classification) and divided by the step's total target count, so accumulation equals one
big batch (docs/train.md). The learning rate of step k (0-based) is ``lr * factor(k)``: linear warmup
from 0 (the first update uses lr 0 when warmup > 0, as transformers does), then cosine or linear decay.

Checkpoints (``<output_dir>/checkpoints/step-NNNNNN/``) hold ``trainable.safetensors`` (every trainable
parameter), ``optimizer.safetensors`` (the optimizer's tensors) and ``state.json`` (step, history, RNG
states, early-stopping state, optimizer hyper-parameters, a model fingerprint). Each is written to a
temporary directory then renamed, so a kill at any moment leaves only whole checkpoints; the last
``keep_last`` are kept. Resuming restores all of it: on CPU the losses then equal an uninterrupted run's
bit for bit (the data order is a pure function of seed and epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lowrank import distributed as _distributed
from lowrank.config import OPTIMIZERS, PRECISIONS, SCHEDULES, TASK_KINDS, ConfigError, TrainConfig, config_from_dict
from lowrank.data import collate, target_count
from lowrank.evaluate import evaluate
from lowrank.loss import autocast_for, loss_sum
from lowrank.optim import optimizer_state_from_tensors, optimizer_state_to_tensors


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or belongs to another model or run."""


@dataclass
class TrainResult:
    history: list[dict]  # one entry per optimizer step (loss, lr, grad_norm, delta_w, ...)
    evals: list[dict]  # one entry per evaluation (step + metrics)
    steps: int
    total_time_s: float  # wall time of the steps run in this process
    stopped_early: bool
    best_metric: float | None
    checkpoints: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr for 0-based optimizer step ``step`` (transformers' shapes)."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batch(data: Sequence[dict], index: int, batch_size: int, seed: int) -> list[dict]:
    """Micro-batch ``index`` of the endless, per-epoch shuffled stream (a pure function: resumable)."""
    per_epoch = math.ceil(len(data) / batch_size)
    epoch, position = divmod(index, per_epoch)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [data[i] for i in order[position * batch_size : (position + 1) * batch_size].tolist()]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was requested but CUDA is not available")
    return device


# --------------------------------------------------------------------------------------- ‖ΔW‖_F


class DeltaTracker:
    """‖ΔW_t‖_F of tracked matrices: ``s·B·A`` for LoRA modules, ``W_t - W_0`` for trainable 2-D weights.

    ‖s·B·A‖_F is computed from r×r Gram matrices (s·sqrt(tr((BᵀB)(AAᵀ)))), never forming B·A.
    """

    def __init__(self, model: torch.nn.Module, max_dense: int = 64):
        self.lora = {n: m for n, m in model.named_modules() if _is_lora(m)}
        lora_params = {id(p) for m in self.lora.values() for p in (m.lora_A, m.lora_B)}
        self.dense = {}
        for name, p in model.named_parameters():
            if (
                p.requires_grad
                and p.dim() == 2
                and id(p) not in lora_params
                and len(self.dense) < max_dense
                and "embed" not in name
                and "wte" not in name
                and "wpe" not in name
            ):
                self.dense[name] = (p, p.detach().clone())

    @torch.no_grad()
    def norms(self) -> dict[str, float]:
        out = {}
        for name, m in self.lora.items():
            a, b = m.lora_A.float(), m.lora_B.float()
            gram = (b.T @ b) @ (a @ a.T)
            out[name] = float(abs(_scale(m)) * gram.trace().clamp_min(0).sqrt())
        for name, (p, p0) in self.dense.items():
            out[name] = float((p.float() - p0.float()).norm())
        return out


def _is_lora(m) -> bool:
    return isinstance(getattr(m, "lora_A", None), torch.Tensor) and isinstance(getattr(m, "lora_B", None), torch.Tensor)


def _scale(m) -> float:
    s = getattr(m, "scale", getattr(m, "scaling", 1.0))
    return float(s() if callable(s) else s)


# --------------------------------------------------------------------------------------- checkpoints


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the model class and every parameter/buffer name and shape (catches resuming another model)."""
    items = [type(model).__name__] + [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, state: dict, keep_last: int) -> Path:
    """Write ``step-NNNNNN`` atomically (temporary directory, then rename); keep the last ``keep_last``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}))
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of a killed write are ignored)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").is_file())


def load_checkpoint(path: Path, model, optimizer, fingerprint: str, check_trainable: bool = True) -> dict:
    """Restore trainable weights + optimizer state from ``path``; returns its state.json."""
    try:
        state = json.loads((path / "state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was written for another model (fingerprint {state.get('fingerprint')}, "
            f"this model {fingerprint}); resume with the same model, adapters and freezing policy"
        )
    params = dict(model.named_parameters())
    current = {n for n, p in params.items() if p.requires_grad}
    if not check_trainable:
        current = set(trainable)
    if set(trainable) != current or not current <= set(params):
        extra, lacking = sorted(set(trainable) - current), sorted(current - set(trainable))
        raise CheckpointError(
            f"checkpoint {path} trains other parameters than this run (only in the checkpoint: {extra[:4]}, "
            f"only in this run: {lacking[:4]}); resume with the same adapters and freezing policy"
        )
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
            params[name].requires_grad_(True)
    try:
        optimizer_state_from_tensors(optimizer, opt_tensors, state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit this run: {e}") from None
    return state


# --------------------------------------------------------------------------------------- the loop


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _build_optimizer(config: TrainConfig, groups):
    kwargs = dict(
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    if config.optimizer == "paged_adamw":
        from lowrank.optim import PagedAdamW

        return PagedAdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def train(
    model: torch.nn.Module,
    train_data: Sequence[dict],
    eval_data: Sequence[dict] | None,
    config: TrainConfig,
    *,
    param_groups: list[dict] | None = None,
    unfreeze=None,
    on_step: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on tokenized examples (see :mod:`lowrank.data`).

    param_groups: optimizer groups (e.g. discriminative learning rates, ``{"params", "lr"}``); default
        one group of every parameter with ``requires_grad``.
    unfreeze: a gradual-unfreezing schedule, ``unfreeze.apply(model, step)`` called before each step.
    on_step: called with each step's log entry (after any checkpoint of that step is written).
    """

    config.validate()
    if not train_data:
        raise ConfigError("train_data is empty: nothing to train on")
    dist_ctx = _distributed.setup(config.distributed, resolve_device(config.device), config.batch_size)
    device = dist_ctx.device
    if dist_ctx.active and unfreeze is not None:
        raise ConfigError(
            f"distributed={config.distributed!r} cannot change the trained parameters mid-run: "
            "gradual unfreezing needs a single-process run"
        )
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model.to(device)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works when every input of a block is frozen (QLoRA embeddings).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ConfigError(
                "gradient_checkpointing=True needs a transformers model (activation_checkpointing_enable)"
            )
    if unfreeze is not None:
        unfreeze.apply(model, 0)
    if param_groups is None:
        trainable = [
            p for p in model.parameters() if p.is_floating_point() and (p.requires_grad or unfreeze is not None)
        ]
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("the model has no trainable parameters (everything is frozen)")
        param_groups = [{"params": trainable}]
    for group in param_groups:
        group.setdefault("lr", config.lr)
        group["base_lr"] = group["lr"]
    tracker = DeltaTracker(model)
    fingerprint = model_fingerprint(model)
    forward_model, param_groups = dist_ctx.wrap(model, param_groups)  # DDP / FSDP2, or the model itself
    optimizer = _build_optimizer(config, param_groups)

    per_epoch = math.ceil(len(train_data) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))
    ckpt_root = Path(config.output_dir) / "checkpoints" if config.output_dir else None
    history: list[dict] = []
    evals: list[dict] = []
    checkpoints: list[str] = []
    start_step, best, bad_evals, stopped_early = 0, None, 0, False

    if config.resume:
        found = list_checkpoints(ckpt_root)
        if not found:
            raise CheckpointError(f"resume was requested but {ckpt_root} holds no complete checkpoint")
        state, rng = _resume(dist_ctx, found[-1], model, optimizer, fingerprint, check_trainable=unfreeze is None)
        if state["total_steps"] != total_steps or state["seed"] != config.seed:
            raise CheckpointError(
                f"checkpoint {found[-1]} is from a run of {state['total_steps']} steps with seed {state['seed']}; "
                f"this run has {total_steps} steps with seed {config.seed}: resume with the same configuration"
            )
        start_step, history, evals = state["step"], state["history"], state["evals"]
        best, bad_evals = state["best"], state["bad_evals"]
        _set_rng_state(rng)

    model.train()
    progress = _progress(config, total_steps, start_step) if dist_ctx.is_main else None
    t_start = time.perf_counter()
    step = start_step
    while step < total_steps:
        if unfreeze is not None:
            unfreeze.apply(model, step)
        t0 = time.perf_counter()
        shares = [  # a single process takes the whole micro-batch; rank r of N its r-th slice
            dist_ctx.share(micro_batch(train_data, step * config.grad_accum + i, config.batch_size, config.seed))
            for i in range(config.grad_accum)
        ]
        batches = [collate(examples, config.pad_token_id) for examples, _ in shares]
        real = [is_real for _, is_real in shares]
        n_targets = sum(target_count(b) for b, r in zip(batches, real, strict=True) if r)
        if dist_ctx.active:
            n_targets = int(dist_ctx.all_sum([n_targets])[0])
        factor = lr_factor(step, total_steps, config.warmup_steps, config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        step_loss, n_tokens = 0.0, 0
        for batch, is_real in zip(batches, real, strict=True):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast_for(config.precision, device):
                total, _ = loss_sum(forward_model, batch, config.task)
            loss = total / max(n_targets, 1)
            if dist_ctx.active:  # DDP / FSDP2 average gradients over ranks: the sum is the single-process one
                loss = loss * (dist_ctx.world if is_real else 0.0)
            loss.backward()
            if is_real:
                step_loss += total.item()
                n_tokens += int(batch["attention_mask"].sum())
        if dist_ctx.active:
            step_loss, n_tokens = dist_ctx.all_sum([step_loss, n_tokens])
            n_tokens = int(n_tokens)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = dist_ctx.grad_norm(params, clip) if params else 0.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        deltas = tracker.norms()
        entry = {
            "step": step,
            "loss": step_loss / max(n_targets, 1),
            "lr": config.lr * factor,
            "grad_norm": grad_norm,
            "targets": n_targets,
            "tokens": n_tokens,
            "time_s": dt,
            "tokens_per_s": n_tokens / dt if dt > 0 else 0.0,
            "peak_mem_mb": peak_memory_mb(device),
            "delta_w": deltas,
            "delta_w_total": math.sqrt(sum(v * v for v in deltas.values())),
        }
        history.append(entry)

        if eval_data and config.eval_every and (step % config.eval_every == 0 or step == total_steps):
            metrics = evaluate(
                model,
                eval_data,
                config.task,
                batch_size=config.batch_size,
                pad_token_id=config.pad_token_id,
                device=device,
                precision=config.precision,
            )
            evals.append({"step": step, **metrics})
            model.train()
            if config.early_stopping_patience:
                score = metrics["loss"]
                if best is None or score < best - config.early_stopping_threshold:
                    best, bad_evals = score, 0
                else:
                    bad_evals += 1
                    stopped_early = bad_evals >= config.early_stopping_patience
        if (
            ckpt_root is not None
            and config.save_every
            and (step % config.save_every == 0 or step == total_steps or stopped_early)
        ):
            state = {
                "step": step,
                "total_steps": total_steps,
                "seed": config.seed,
                "fingerprint": fingerprint,
                "history": history,
                "evals": evals,
                "best": best,
                "bad_evals": bad_evals,
                "rng": _rng_state(),
                "config": asdict(config),
            }
            if dist_ctx.active:  # every rank writes its shard (DCP); rank 0 the metadata
                path = _distributed.save_checkpoint(
                    dist_ctx, ckpt_root, step, model, optimizer, state, state["rng"], config.keep_last
                )
            else:
                path = save_checkpoint(ckpt_root, step, model, optimizer, state, config.keep_last)
            checkpoints.append(str(path))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{entry['loss']:.4f}",
                lr=f"{entry['lr']:.2e}",
                tok_s=f"{entry['tokens_per_s']:.0f}",
                mem_mb=f"{entry['peak_mem_mb']:.0f}",
            )
        if on_step is not None and dist_ctx.is_main:
            on_step(entry)
        if stopped_early:
            break
    if progress is not None:
        progress.close()
    dist_ctx.finish(model)  # FSDP2: full tensors again on every rank
    model.eval()
    return TrainResult(
        history=history,
        evals=evals,
        steps=step,
        total_time_s=time.perf_counter() - t_start,
        stopped_early=stopped_early,
        best_metric=best,
        checkpoints=checkpoints,
    )


def _resume(dist_ctx, path: Path, model, optimizer, fingerprint: str, check_trainable: bool) -> tuple[dict, dict]:
    """(state.json, RNG state) of the checkpoint at ``path``: a sharded (DCP) one from any number of ranks,
    or a single-process one (which DDP ranks read whole; FSDP2 needs a sharded one)."""
    if _distributed.is_sharded_checkpoint(path):
        return _distributed.load_checkpoint(dist_ctx, path, model, optimizer, fingerprint)
    if dist_ctx.mode == "fsdp2":
        raise CheckpointError(
            f"checkpoint {path} was written by a single-process run: resume it without --distributed or with "
            "--distributed ddp (fsdp2 resumes the sharded checkpoints that distributed runs write)"
        )
    state = load_checkpoint(path, model, optimizer, fingerprint, check_trainable=check_trainable)
    return state, state["rng"]


def _progress(config: TrainConfig, total: int, start: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "TASK_KINDS",
    "CheckpointError",
    "ConfigError",
    "DeltaTracker",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "list_checkpoints",
    "lr_factor",
    "train",
]
