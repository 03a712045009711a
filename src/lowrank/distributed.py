"""Data-parallel training across processes (``torchrun``): DDP or FSDP2, and sharded checkpoints (DCP).

``TrainConfig(distributed="ddp" | "fsdp2")`` (CLI: ``--distributed``) under ``torchrun --nproc_per_node N``:

* **The same run as one process.** ``batch_size`` stays the *global* micro-batch: each rank takes its
  contiguous ``batch_size / N`` slice of every micro-batch of the single-process data order. Target
  counts and loss sums are all-reduced, and each rank back-propagates ``local_sum · N / global_targets``
  (DDP and FSDP2 average gradients over ranks), so the gradient is the single-process one up to the
  order of the floating-point reductions.
* **DDP** wraps the model with ``broadcast_buffers=False`` (the packed 4-bit base is identical on every
  rank; broadcasting it would move the whole base every step). **FSDP2** applies ``fully_shard`` to every
  decoder layer (the classes in ``model._no_split_modules``) and then to the root; at the end of
  ``train()`` every sharded module is unsharded, so the model holds plain full tensors again (saving the
  adapter, evaluating and merging work as after a single-process run).
* **Only rank 0 writes** logs, reports, adapters and checkpoint metadata; every rank writes its shard.
* **Checkpoints** are ``torch.distributed.checkpoint`` directories (no pickle): every trainable parameter
  and every optimizer state tensor by parameter name (DTensors under FSDP2), plus ``state.json`` (step,
  history, per-rank RNG states, fingerprint). All ranks write into ``.step-NNNNNN.tmp-*``; rank 0
  renames it to ``step-NNNNNN`` once every shard and the metadata are complete, so a kill leaves only
  whole checkpoints. DCP re-shards on load, so a checkpoint written by N ranks resumes on M ranks
  (including a single process without ``torchrun``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lowrank import files
from lowrank.config import DISTRIBUTED as MODES
from lowrank.config import ConfigError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ConfigError):
    """A distributed run cannot start as configured (not under torchrun, a batch the ranks cannot split)."""


class DistributedCheckpointError(ValueError):
    """A sharded checkpoint does not fit this run."""


class DamagedShardedCheckpoint(DistributedCheckpointError):
    """A sharded checkpoint's files are missing, truncated or unreadable (resuming falls back to an older one)."""


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def is_main_process() -> bool:
    """True on rank 0 of a distributed run, and in every single-process run."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass
class Context:
    """Where this process stands in the run: ``mode``, ``rank``, ``world`` and the device it trains on."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data and reductions ---------------------------------------------------------------------------

    def share(self, examples: list) -> tuple[list, bool]:
        """This rank's contiguous slice of a global micro-batch, and whether it holds real examples.

        A short last micro-batch can leave a rank empty: it then runs the first example with weight 0, so
        that every rank takes part in the same collectives."""
        if not self.active:
            return examples, True
        per_rank = -(-len(examples) // self.world)
        mine = examples[self.rank * per_rank : (self.rank + 1) * per_rank]
        return (mine, True) if mine else (examples[:1], False)

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # -- the model -------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, param_groups: list[dict]) -> tuple[nn.Module, list[dict]]:
        """(module to call for forward/backward, param_groups pointing at the parameters it trains)."""
        if not self.active:
            return model, param_groups
        names = {id(p): n for n, p in model.named_parameters()}
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            blocks = set(getattr(model, "_no_split_modules", None) or [])
            layers = [m for m in model.modules() if type(m).__name__ in blocks and m is not model]
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
        self._model = model
        params = dict(model.named_parameters())
        groups = [{**g, "params": [params[names[id(p)]] for p in g["params"]]} for g in param_groups]
        return wrapped, groups

    def finish(self, model: nn.Module) -> None:
        """After training: FSDP2 modules are unsharded for good (plain full tensors on every rank)."""
        if self.mode != "fsdp2":
            return
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_reshard_after_forward(False, recurse=False)
                module.unshard()

    def grad_norm(self, params: list[torch.Tensor], clip: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)


def setup(mode: str, device: torch.device, batch_size: int) -> Context:
    """Join the torchrun process group for ``mode`` (``"none"``: a single-process context)."""
    if mode not in MODES:
        raise DistributedError(f"distributed={mode!r} is not one of {MODES}")
    if mode == "none":
        return Context(device=device)
    if not launched_by_torchrun():
        raise DistributedError(
            f"distributed={mode!r} needs the processes torchrun starts (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
            f"are not set): launch with `torchrun --nproc_per_node N -m lowrank finetune ... --distributed {mode}`"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        atexit.register(_shutdown)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if batch_size % world:
        raise DistributedError(
            f"batch_size={batch_size} is the global micro-batch and must split evenly over the world size "
            f"{world} (each rank takes batch_size / world examples): use a multiple of {world}"
        )
    return Context(mode=mode, rank=rank, world=world, device=device)


def _shutdown() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


# -- sharded checkpoints ------------------------------------------------------------------------------


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every trainable parameter and optimizer state tensor, by name (the live tensors: DCP loads in place)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"model/{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optim/{names[id(p)]}/{key}"] = value
    return out


def _initialise_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (one step with zero gradients and lr 0 changes no parameter)."""
    saved = [(g["lr"], g.get("weight_decay")) for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, (lr, _) in zip(optimizer.param_groups, saved, strict=True):
        g["lr"] = lr


def save_checkpoint(
    ctx: Context, ckpt_root: Path, step: int, model: nn.Module, optimizer, state: dict, rng: dict, keep_last: int
) -> Path:
    """Write ``step-NNNNNN`` as a DCP checkpoint from every rank, atomically; keep the last ``keep_last``."""
    import torch.distributed.checkpoint as dcp

    final = ckpt_root / f"step-{step:06d}"
    names = [str(ckpt_root / f".step-{step:06d}.tmp-{uuid.uuid4().hex[:8]}")] if ctx.is_main else [None]
    rngs = [rng]
    if ctx.active:
        dist.broadcast_object_list(names, src=0)
        rngs = [None] * ctx.world
        dist.all_gather_object(rngs, rng)
    tmp = Path(names[0])
    if ctx.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    try:
        dcp.save(_state_tensors(model, optimizer), checkpoint_id=str(tmp), no_dist=not ctx.active)
        ctx.barrier()  # every shard and the metadata are on disk
        if ctx.is_main:
            files.write_json(tmp / "state.json", {**state, "world_size": ctx.world, "rng_by_rank": rngs})
            _move_into_place(tmp, final)
            complete = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").is_file())
            for old in complete[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    ctx.barrier()
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory to ``final`` (a re-run of the same step replaces it whole)."""
    if final.exists():
        old = final.with_name(f".{final.name}.tmp-old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def load_checkpoint(ctx: Context, path: Path, model: nn.Module, optimizer, fingerprint: str) -> tuple[dict, dict]:
    """Restore a DCP checkpoint written by any number of ranks; returns (state.json, this rank's RNG state)."""
    import torch.distributed.checkpoint as dcp

    try:
        state = files.read_json(path / "state.json", what="checkpoint state")
    except files.FileFormatError as e:
        raise DamagedShardedCheckpoint(f"checkpoint {path} is damaged: {e}") from None
    if not isinstance(state, dict) or not {"step", "total_steps", "seed", "rng_by_rank"} <= set(state):
        raise DamagedShardedCheckpoint(f"checkpoint {path} is damaged: state.json lacks step/total_steps/seed/rng")
    if state.get("fingerprint") != fingerprint:
        raise DistributedCheckpointError(
            f"checkpoint {path} was written for another model (fingerprint {state.get('fingerprint')}, this model "
            f"{fingerprint}); resume with the same model, adapters and freezing policy"
        )
    _initialise_optimizer_state(optimizer)
    tensors = _state_tensors(model, optimizer)
    try:
        stored = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as e:
        raise DamagedShardedCheckpoint(f"checkpoint {path} has unreadable DCP metadata: {e}") from None
    if stored != set(tensors):
        only_ckpt, only_run = sorted(stored - set(tensors)), sorted(set(tensors) - stored)
        raise DistributedCheckpointError(
            f"checkpoint {path} holds other tensors than this run trains (only in the checkpoint: {only_ckpt[:4]}, "
            f"only in this run: {only_run[:4]}); resume with the same adapters, freezing policy and optimizer"
        )
    try:
        dcp.load(tensors, checkpoint_id=str(path), no_dist=not ctx.active)
    except Exception as e:
        raise DamagedShardedCheckpoint(f"checkpoint {path} cannot be read: {e}") from None
    rngs = state.get("rng_by_rank") or []
    rng = rngs[ctx.rank] if ctx.rank < len(rngs) else rngs[0]
    return state, rng


__all__ = [
    "MODES",
    "Context",
    "DamagedShardedCheckpoint",
    "DistributedCheckpointError",
    "DistributedError",
    "is_main_process",
    "is_sharded_checkpoint",
    "launched_by_torchrun",
    "load_checkpoint",
    "save_checkpoint",
    "setup",
]
