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
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowrank import distributed as _distributed
from lowrank import files
from lowrank import trackers as _trackers
from lowrank.config import OPTIMIZERS, PRECISIONS, SCHEDULES, TASK_KINDS, ConfigError, TrainConfig, config_from_dict
from lowrank.data import collate, target_count
from lowrank.evaluate import evaluate
from lowrank.loss import autocast_for, loss_sum
from lowrank.optim import optimizer_state_from_tensors, optimizer_state_to_tensors


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or belongs to another model or run."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint's files are truncated or unreadable (resuming falls back to an older one)."""


class OutputWriteError(CheckpointError):
    """A checkpoint or log could not be written (disk full, read-only); the message names the last intact checkpoint."""


@dataclass
class TrainResult:
    history: list[dict]  # one entry per optimizer step (loss, lr, grad_norm, delta_w, ...)
    evals: list[dict]  # one entry per evaluation (step + metrics)
    steps: int
    total_time_s: float  # wall time of the whole run's steps (earlier sessions of a resumed run included)
    stopped_early: bool
    best_metric: float | None
    checkpoints: list[str] = field(default_factory=list)
    resumed_from: int | None = None  # the step the run resumed from (None: started at step 0)
    session_time_s: float = 0.0  # wall time of the steps run in this process


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


# --------------------------------------------------------------------------------------- loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was requested but CUDA is not available")
    return device


# --------------------------------------------------------------------------------------- ‖ΔW‖_F


class DeltaTracker:
    """‖ΔW_t‖_F = ‖W_t − W_{t−1}‖_F per optimizer step, and the cumulative ‖W_t − W_0‖_F, of tracked matrices.

    LoRA modules contribute their effective update s·B·A; trainable 2-D weights their own change. For
    LoRA, B_t·A_t − B'·A' = [B_t − B', B']·[A_t; A_t − A'] (out × 2r times 2r × in), whose Frobenius
    norm comes from 2r × 2r Gram matrices in float64: B·A is never formed and nothing cancels.
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
                self.dense[name] = p
        self.start = self._snapshot()
        self.previous = self.start

    @torch.no_grad()
    def _snapshot(self) -> dict:
        snap = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in self.lora.items()}
        snap.update({n: p.detach().clone() for n, p in self.dense.items()})
        return snap

    def reset_previous(self) -> None:
        """W_{t−1} := the current weights (after a checkpoint was loaded)."""
        self.previous = self._snapshot()

    @torch.no_grad()
    def norms(self) -> tuple[dict[str, float], dict[str, float]]:
        """(‖W_t − W_{t−1}‖_F, ‖W_t − W_0‖_F) per tracked matrix; W_t becomes the next step's W_{t−1}."""
        now = self._snapshot()
        step, cumulative = {}, {}
        for name, m in self.lora.items():
            scale = abs(_scale(m))
            step[name] = scale * _product_change_norm(self.previous[name], now[name])
            cumulative[name] = scale * _product_change_norm(self.start[name], now[name])
        for name in self.dense:
            step[name] = float((now[name].double() - self.previous[name].double()).norm())
            cumulative[name] = float((now[name].double() - self.start[name].double()).norm())
        self.previous = now
        return step, cumulative


def _product_change_norm(before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor]) -> float:
    """‖B·A − B'·A'‖_F for (A', B') = before, (A, B) = after, from Gram matrices (A: r × in, B: out × r)."""
    (a0, b0), (a1, b1) = before, after
    a0, b0, a1, b1 = (t.double() for t in (a0, b0, a1, b1))
    u = torch.cat([b1 - b0, b0], dim=1)  # out × 2r
    v = torch.cat([a1, a1 - a0], dim=0)  # 2r × in
    return float(((u.T @ u) @ (v @ v.T)).trace().clamp_min(0).sqrt())


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


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, state: dict, keep_last: int) -> Path:
    """Write ``step-NNNNNN`` atomically (``lowrank.files.atomic_directory``); keep the last ``keep_last``."""
    final = ckpt_root / f"step-{step:06d}"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer)
    with files.atomic_directory(final) as tmp:  # a re-run of the same step after a resume replaces it whole
        files.write_safetensors(tmp / "trainable.safetensors", trainable)
        files.write_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        files.write_json(tmp / "state.json", {**state, "optimizer": opt_meta}, indent=None)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path | None) -> list[Path]:
    """Checkpoint directories, oldest first (temporary directories of a killed write are ignored)."""
    if ckpt_root is None or not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and (p / "state.json").is_file())


def load_checkpoint(path: Path, model, optimizer, fingerprint: str, check_trainable: bool = True) -> dict:
    """Restore trainable weights + optimizer state from ``path``; returns its state.json.

    A file that cannot be read raises :class:`DamagedCheckpoint` (before anything is restored); a
    checkpoint of another model or run raises :class:`CheckpointError`.
    """
    try:
        state = files.read_json(path / "state.json", what="checkpoint state")
        trainable = files.read_safetensors(path / "trainable.safetensors")
        opt_tensors = files.read_safetensors(path / "optimizer.safetensors")
    except files.FileFormatError as e:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {e}") from None
    if not isinstance(state, dict) or not {"step", "total_steps", "seed", "optimizer"} <= set(state):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: state.json lacks step/total_steps/seed/optimizer")
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


def _read_log(path: Path, lines: int, what: str) -> list[dict]:
    """The first ``lines`` entries of an appended JSON-lines log (a checkpoint's history)."""
    if lines == 0:
        return []
    try:
        raw = path.read_text(encoding="utf-8").splitlines()[:lines]
        entries = [json.loads(line) for line in raw]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpoint(f"{what} {path} is unreadable: {e}") from None
    if len(entries) < lines:
        raise DamagedCheckpoint(f"{what} {path} holds {len(entries)} entries, the checkpoint needs {lines}")
    return entries


class _AppendLog:
    """A JSON-lines file that grows by one line per entry (the run's history; checkpoints store its length)."""

    def __init__(self, path: Path | None, entries: list[dict]):
        self.path = path
        if path is not None:  # start from exactly the entries the resumed checkpoint knows (a rewrite, once)
            files.write_text(path, "".join(json.dumps(e) + "\n" for e in entries))

    def append(self, entry: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())


def _resume(ckpt_root: Path, out: Path, model, optimizer, fingerprint: str, check_trainable: bool, dist=None) -> tuple:
    """(state, history, evals, path) of the newest intact checkpoint; damaged newer ones are skipped with a warning."""
    found = list_checkpoints(ckpt_root)
    if not found:
        raise CheckpointError(f"resume was requested but {ckpt_root} holds no complete checkpoint")
    problems = []
    for path in reversed(found):
        try:
            state = _load_any_checkpoint(dist, path, model, optimizer, fingerprint, check_trainable)
            if "history" in state:  # written before the history moved to log.jsonl
                history, evals = state.pop("history"), state.pop("evals", [])
            else:
                history = _read_log(out / "log.jsonl", state["log_lines"], "training log")
                evals = _read_log(out / "evals.jsonl", state["eval_lines"], "evaluation log")
        except DamagedCheckpoint as e:
            problems.append(str(e))
            continue
        for problem in problems:
            print(f"lowrank: warning: {problem}; resuming from the older {path.name}", file=sys.stderr, flush=True)
        return state, history, evals, path
    raise CheckpointError(f"no intact checkpoint in {ckpt_root}: " + "; ".join(problems))


def _load_any_checkpoint(dist, path: Path, model, optimizer, fingerprint: str, check_trainable: bool) -> dict:
    """A sharded (DCP) checkpoint from any number of ranks, or a single-process one (which DDP ranks read
    whole; FSDP2 needs a sharded one). ``state["rng"]`` is this rank's RNG state."""
    if _distributed.is_sharded_checkpoint(path):
        try:
            state, rng = _distributed.load_checkpoint(
                dist or _distributed.Context(), path, model, optimizer, fingerprint
            )
        except _distributed.DamagedShardedCheckpoint as e:
            raise DamagedCheckpoint(str(e)) from None
        return {**state, "rng": rng}
    if dist is not None and dist.mode == "fsdp2":
        raise CheckpointError(
            f"checkpoint {path} was written by a single-process run: resume it without --distributed or with "
            "--distributed ddp (fsdp2 resumes the sharded checkpoints that distributed runs write)"
        )
    return load_checkpoint(path, model, optimizer, fingerprint, check_trainable)


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
    reporter: _trackers.Reporter | None = None,
) -> TrainResult:
    """Train ``model`` in place on tokenized examples (see :mod:`lowrank.data`).

    param_groups: optimizer groups (e.g. discriminative learning rates, ``{"params", "lr"}``); default
        one group of every parameter with ``requires_grad``.
    unfreeze: a gradual-unfreezing schedule, ``unfreeze.apply(model, step)`` called before each step.
    on_step: called with each step's log entry (after any checkpoint of that step is written).
    reporter: the experiment trackers to report to, left open for the caller to close (default: a run of
        ``config.report_to``'s trackers, opened here and closed at the end).
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
    fingerprint = model_fingerprint(model)
    forward_model, param_groups = dist_ctx.wrap(model, param_groups)  # DDP / FSDP2, or the model itself
    tracker = DeltaTracker(model)  # after wrapping: under FSDP2 it tracks the sharded parameters
    optimizer = _build_optimizer(config, param_groups)

    per_epoch = math.ceil(len(train_data) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))
    out = Path(config.output_dir) if config.output_dir else None
    ckpt_root = out / "checkpoints" if out is not None and config.checkpoints else None
    history: list[dict] = []
    evals: list[dict] = []
    checkpoints: list[str] = []
    start_step, best, bad_evals, stopped_early, elapsed_before = 0, None, 0, False, 0.0
    resumed_from = None
    last_checkpoint: str | None = None

    if out is not None and dist_ctx.is_main:  # distributed: rank 0 alone writes the run's files
        out.mkdir(parents=True, exist_ok=True)
        files.remove_stale_temporaries(out)  # what a kill in the middle of an atomic write left behind
        files.remove_stale_temporaries(out / "checkpoints")
    dist_ctx.barrier()
    if config.resume:
        state, history, evals, path = _resume(
            out / "checkpoints", out, model, optimizer, fingerprint, check_trainable=unfreeze is None, dist=dist_ctx
        )
        if state["total_steps"] != total_steps or state["seed"] != config.seed:
            raise CheckpointError(
                f"checkpoint {path} is from a run of {state['total_steps']} steps with seed {state['seed']}; "
                f"this run has {total_steps} steps with seed {config.seed}: resume with the same configuration"
            )
        start_step, best, bad_evals = state["step"], state["best"], state["bad_evals"]
        elapsed_before, resumed_from, last_checkpoint = state.get("elapsed_s", 0.0), start_step, str(path)
        tracker.reset_previous()
        _set_rng_state(state["rng"])
        if dist_ctx.is_main:
            print(f"resumed from step {start_step} of {total_steps} ({path})", flush=True)
    writes = out is not None and dist_ctx.is_main
    log = _AppendLog(out / "log.jsonl" if writes else None, history)
    eval_log = _AppendLog(out / "evals.jsonl" if writes else None, evals)

    own_reporter = reporter is None
    if own_reporter:
        reporter = _trackers.open_trackers(config.report_to, asdict(config), config.output_dir)
    model.train()
    progress = _progress(config, total_steps, start_step) if dist_ctx.is_main else None
    t_start = time.perf_counter()
    step = start_step
    try:
        while step < total_steps:
            if unfreeze is not None:
                unfreeze.apply(model, step)
            t0, c0 = time.perf_counter(), time.process_time()
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
            dt, cpu_dt = time.perf_counter() - t0, time.process_time() - c0
            deltas, cumulative = tracker.norms()
            entry = {
                "step": step,
                "loss": step_loss / max(n_targets, 1),
                "lr": config.lr * factor,
                "grad_norm": grad_norm,
                "targets": n_targets,
                "tokens": n_tokens,
                "time_s": dt,
                "cpu_time_s": cpu_dt,
                "tokens_per_s": n_tokens / dt if dt > 0 else 0.0,
                "peak_mem_mb": peak_memory_mb(device),
                "delta_w": deltas,
                "delta_w_total": math.sqrt(sum(v * v for v in deltas.values())),
                "delta_w_cumulative": math.sqrt(sum(v * v for v in cumulative.values())),
            }
            history.append(entry)
            reporter.log_step(entry)
            _write_or_fail(log.append, entry, "the training log", out, step, last_checkpoint)

            at_end = step == total_steps
            if eval_data and ((config.eval_every and step % config.eval_every == 0) or at_end):
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
                reporter.log_eval(step, metrics)
                _write_or_fail(eval_log.append, evals[-1], "the evaluation log", out, step, last_checkpoint)
                model.train()
                if config.early_stopping_patience and config.eval_every:
                    score = metrics["loss"]
                    if best is None or score < best - config.early_stopping_threshold:
                        best, bad_evals = score, 0
                    else:
                        bad_evals += 1
                        stopped_early = bad_evals >= config.early_stopping_patience
            epoch_end = (step * config.grad_accum) // per_epoch > ((step - 1) * config.grad_accum) // per_epoch
            periodic = config.save_every and step % config.save_every == 0
            if ckpt_root is not None and (periodic or epoch_end or at_end or stopped_early):
                state = {
                    "step": step,
                    "total_steps": total_steps,
                    "seed": config.seed,
                    "fingerprint": fingerprint,
                    "log_lines": len(history),
                    "eval_lines": len(evals),
                    "best": best,
                    "bad_evals": bad_evals,
                    "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                    "rng": _rng_state(),
                    "config": asdict(config),
                }
                saved = _write_or_fail(
                    save_checkpoint if not dist_ctx.active else _distributed.save_checkpoint,
                    (ckpt_root, step, model, optimizer, state, config.keep_last)
                    if not dist_ctx.active  # every rank writes its shard (DCP); rank 0 the metadata
                    else (dist_ctx, ckpt_root, step, model, optimizer, state, state["rng"], config.keep_last),
                    f"checkpoint step-{step:06d}",
                    out,
                    step,
                    last_checkpoint,
                )
                last_checkpoint = str(saved)
                checkpoints.append(last_checkpoint)
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
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        if own_reporter:
            reporter.close(failed=True)
        raise  # the bar is closed, so a Ctrl-C message prints on a line of its own
    if progress is not None:
        progress.close()
    dist_ctx.finish(model)  # FSDP2: full tensors again on every rank
    if own_reporter:
        reporter.close()
    model.eval()
    session = time.perf_counter() - t_start
    return TrainResult(
        history=history,
        evals=evals,
        steps=step,
        total_time_s=elapsed_before + session,
        stopped_early=stopped_early,
        best_metric=best,
        checkpoints=checkpoints,
        resumed_from=resumed_from,
        session_time_s=session,
    )


def _write_or_fail(write, args, what: str, out: Path | None, step: int, last_checkpoint: str | None):
    """Run a write of the loop; an OSError (disk full, read-only) becomes one clear OutputWriteError."""
    try:
        return write(*args) if isinstance(args, tuple) else write(args)
    except OSError as e:
        kept = (
            f"the last intact checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        )
        raise OutputWriteError(
            f"cannot write {what} at step {step} in {out}: {e.strerror or e}; {kept} "
            "(free space or fix permissions, then rerun with --resume)"
        ) from None


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
