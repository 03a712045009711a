"""``TrainConfig``: every knob of a training run, with its range check and its command-line flag.

This module imports nothing heavy (no torch), so the ``lowrank`` command can build its parser and
reject a bad flag before torch loads. A field declared with :func:`flag` becomes ``--field-name`` on
``lowrank finetune`` / ``lowrank compare`` and is passed to ``TrainConfig`` by name: adding a knob is
one field here (plus its range check in :meth:`TrainConfig.validate`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from lowrank import trackers as _trackers

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "paged_adamw")
PRECISIONS = ("auto", "bf16", "fp32")
TASK_KINDS = ("classification", "generation")
DISTRIBUTED = ("none", "ddp", "fsdp2")  # data parallel across torchrun processes (lowrank.distributed)
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class ConfigError(ValueError):
    """A TrainConfig value is out of range."""


def flag(default: Any, help: str | None = None, **argparse_kwargs) -> Any:
    """A dataclass field that the CLI exposes as ``--name`` (argparse keywords: type, choices, flag, action)."""
    return field(default=default, metadata={"cli": {"help": help, **argparse_kwargs}})


@dataclass
class TrainConfig:
    """Every knob of a run (fields made with :func:`flag` are ``lowrank finetune`` flags)."""

    task: str = "classification"  # classification | generation (causal LM); the CLI's --task
    epochs: float = flag(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = flag(None, "optimizer steps (overrides --epochs)", type=int)
    batch_size: int = flag(8, "examples per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    lr: float = flag(2e-4, "peak learning rate")
    weight_decay: float = flag(0.0)
    adam_beta1: float = flag(0.9)
    adam_beta2: float = flag(0.999)
    adam_eps: float = flag(1e-8)
    warmup_steps: int = flag(0, "linear warmup steps (fewer than the run's steps)")
    schedule: str = flag("cosine", "lr shape after warmup", choices=SCHEDULES)
    max_grad_norm: float = flag(1.0, "0 disables clipping (the norm is still logged)")
    optimizer: str = flag("adamw", "adamw, or paged_adamw (lowrank.optim.PagedAdamW)", choices=OPTIMIZERS)
    precision: str = flag("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS)
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward pass")
    eval_every: int = flag(0, "steps between evaluations (0: only at the end)")
    early_stopping_patience: int = flag(0, "evaluations without improvement before stopping (0: off)")
    early_stopping_threshold: float = flag(0.0)
    save_every: int = flag(0, "steps between extra checkpoints (0: only at each epoch's end and the last step)")
    checkpoints: bool = flag(True, "write no checkpoints", flag="--no-checkpoints", action="store_false")
    keep_last: int = flag(2, "checkpoints kept")
    output_dir: str | None = None  # the CLI's --output
    resume: bool = flag(False, "continue from the last checkpoint in --output")
    seed: int = flag(0, "seed of the head/adapter init and the data order (>= 0)")
    pad_token_id: int = 0
    device: str = flag("auto", "auto, cpu, cuda or cuda:N")
    progress: bool = flag(True, "no progress bar", flag="--no-progress", action="store_false")
    report_to: list[str] | tuple[str, ...] | str = flag(
        (),
        "experiment trackers, comma-separated: tensorboard, wandb, mlflow, trackio, or none (default)",
        type=_trackers.parse_report_to,
        metavar="NAMES",
    )
    distributed: str = flag(
        "none", "data parallel across torchrun processes (batch size is global)", choices=DISTRIBUTED
    )

    def validate(self) -> TrainConfig:
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is out of range: expected {expected}")

        need(self.task in TASK_KINDS, "task", f"one of {TASK_KINDS}")
        need(self.epochs > 0 and math.isfinite(self.epochs), "epochs", "a finite number > 0")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "an integer >= 1")
        need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.grad_accum >= 1, "grad_accum", "an integer >= 1")
        need(0 < self.lr < 1, "lr", "0 < lr < 1")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "0 <= beta1 < 1")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "0 <= beta2 < 1")
        need(self.adam_eps > 0, "adam_eps", "> 0")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 disables clipping)")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        need(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        need(self.eval_every >= 0, "eval_every", ">= 0")
        need(self.early_stopping_patience >= 0, "early_stopping_patience", ">= 0")
        need(
            self.early_stopping_patience == 0 or self.eval_every > 0,
            "early_stopping_patience",
            "0 unless eval_every > 0 (early stopping needs periodic evaluation)",
        )
        need(self.save_every >= 0, "save_every", ">= 0")
        need(self.keep_last >= 1, "keep_last", ">= 1")
        need(self.save_every == 0 or self.output_dir is not None, "save_every", "0 unless output_dir is set")
        need(not self.resume or self.output_dir is not None, "resume", "False unless output_dir is set")
        need(0 <= self.seed < 2**63, "seed", "an integer in 0 .. 2**63 - 1")
        need(self.distributed in DISTRIBUTED, "distributed", f"one of {DISTRIBUTED}")
        need(isinstance(self.device, str) and bool(_DEVICE.match(self.device)), "device", "auto, cpu, cuda or cuda:N")
        try:  # a comma string is accepted and normalized; a tracker that is not installed fails here
            self.report_to = _trackers.parse_report_to(self.report_to)
            _trackers.check_available(self.report_to)
        except _trackers.TrackerError as err:
            raise ConfigError(str(err)) from None
        return self


def config_from_dict(values: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
    return TrainConfig(**values)


__all__ = [
    "DISTRIBUTED",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "TASK_KINDS",
    "ConfigError",
    "TrainConfig",
    "config_from_dict",
    "flag",
]
