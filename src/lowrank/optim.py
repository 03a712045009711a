"""Optimizers: :class:`PagedAdamW` and safetensors (de)serialization of any optimizer's state.

PagedAdamW keeps the two AdamW moments of every large CUDA parameter in pinned host memory and pages
them onto the device only for that parameter's update. Bytes moved per paged parameter and step:
``2 * 4 * n`` host->device plus the same back (fp32 moments), overlapped with the previous
parameter's update on a side stream. Device memory held by optimizer state is then about two
parameters' worth (the one being updated and the one being prefetched) instead of ``8 * N`` bytes.

The update itself is torch's functional AdamW (single-tensor path) on the paged-in tensors, so the
numerics are those of ``torch.optim.AdamW`` bit for bit: on CPU against the default AdamW, on CUDA
against ``AdamW(foreach=False)`` (torch's default multi-tensor path rounds the same way in practice
but is a different kernel, so it is not what we promise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from torch.optim.adamw import adamw as _functional_adamw

from lowrank import files

DEFAULT_PAGE_MIN_NUMEL = 100_000
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_META_KEY = "lowrank_optimizer_state"


class OptimizerStateError(ValueError):
    """A saved optimizer state does not fit the optimizer it is loaded into, or is corrupted."""


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose large CUDA states live in pinned host memory and are paged in per update.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        page_min_numel: parameters with fewer elements keep their state on the device (paging a
            small tensor costs more in launch latency than it saves in memory).
        paged: False keeps every state on the parameter's device (plain AdamW, for comparisons).

    CPU parameters are never paged: on CPU this is AdamW with the same API and state layout, so a
    ``torch.optim.AdamW`` state dict loads into it and back.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        page_min_numel: int = DEFAULT_PAGE_MIN_NUMEL,
        paged: bool = True,
    ) -> None:
        if not (isinstance(lr, torch.Tensor) or lr >= 0.0):
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if int(page_min_numel) < 0:
            raise ValueError(f"page_min_numel must be >= 0, got {page_min_numel}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize
        )
        super().__init__(params, defaults)
        self.page_min_numel = int(page_min_numel)
        self.paged = bool(paged)
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    # -- which states are paged ------------------------------------------------------------------

    def wants_paging(self, p: torch.Tensor) -> bool:
        """True when ``p``'s moments live in pinned host memory (large CUDA parameters)."""
        return self.paged and p.device.type == "cuda" and p.numel() >= self.page_min_numel

    def device_bytes_saved(self) -> int:
        """Bytes of optimizer state currently held in host memory instead of on the device."""
        total = 0
        for p, state in self.state.items():
            if self.wants_paging(p):
                total += sum(state[k].numel() * state[k].element_size() for k in _MOMENT_KEYS if k in state)
        return total

    def _host_buffer(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # pinned memory makes the copies asynchronous; it needs CUDA (and is pointless without it)
        return torch.zeros(like.shape, dtype=dtype, device="cpu", pin_memory=like.device.type == "cuda")

    def _init_state(self, p: torch.Tensor, state: dict, amsgrad: bool) -> None:
        # Same layout as torch.optim.AdamW (non-capturable): a CPU fp32 step counter and moments like p.
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
        keys = _MOMENT_KEYS if amsgrad else _MOMENT_KEYS[:2]
        for key in keys:
            if self.wants_paging(p):
                state[key] = self._host_buffer(p, p.dtype)
            else:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # -- the update ------------------------------------------------------------------------------

    def _update(self, p: torch.Tensor, moments: dict[str, torch.Tensor], step: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        _functional_adamw(
            [p],
            [p.grad],
            [moments["exp_avg"]],
            [moments["exp_avg_sq"]],
            [moments["max_exp_avg_sq"]] if group["amsgrad"] else [],
            [step],
            foreach=False,
            capturable=False,
            differentiable=False,
            fused=False,
            has_complex=torch.is_complex(p),
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device=device)
        return self._side_streams[device]

    def _prefetch(self, p: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """Start copying ``p``'s host moments to fresh device buffers on the side stream."""
        state = self.state[p]
        if p.device.type != "cuda":  # no streams: plain synchronous copies (same bookkeeping)
            return {k: state[k].to(p.device, copy=True) for k in _MOMENT_KEYS if k in state}, None
        main = torch.cuda.current_stream(p.device)
        side = self._side_stream(p.device)
        # Buffers come from the main stream's pool: the side stream must not touch them before the
        # main stream has finished whatever used that memory last.
        buffers = {
            k: torch.empty(state[k].shape, dtype=state[k].dtype, device=p.device) for k in _MOMENT_KEYS if k in state
        }
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for key, buf in buffers.items():
                buf.copy_(state[key], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(side)
        return buffers, ready

    def _write_back(self, p: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        state = self.state[p]
        if p.device.type != "cuda":
            for key, buf in buffers.items():
                state[key].copy_(buf)
            return
        main = torch.cuda.current_stream(p.device)
        side = self._side_stream(p.device)
        side.wait_stream(main)  # the update must be done before its result is copied out
        with torch.cuda.stream(side):
            for key, buf in buffers.items():
                state[key].copy_(buf, non_blocking=True)
        for buf in buffers.values():
            buf.record_stream(side)  # do not recycle the buffer before the copy has read it

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of every parameter that has a gradient (frozen ones are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            todo = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group["amsgrad"])
                elif group["amsgrad"] and "max_exp_avg_sq" not in state:
                    raise OptimizerStateError("amsgrad was switched on after the first step; its state is missing")
                todo.append(p)
            paged = [p for p in todo if self.wants_paging(p)]
            # prefetched copies in paged order; invariant: the head of the queue is the next paged parameter
            in_flight = [self._prefetch(paged[0])] if paged else []
            next_index = 1
            for p in todo:
                state = self.state[p]
                if not self.wants_paging(p):
                    self._update(p, state, state["step"], group)
                    continue
                buffers, ready = in_flight.pop(0)
                if next_index < len(paged):  # overlap the next parameter's copy with this update
                    in_flight.append(self._prefetch(paged[next_index]))
                    next_index += 1
                if ready is not None:
                    torch.cuda.current_stream(p.device).wait_event(ready)
                self._update(p, buffers, state["step"], group)
                self._write_back(p, buffers)
            for device in {p.device for p in paged if p.device.type == "cuda"}:
                # host moments must be complete before anyone reads them (state_dict, the next step)
                self._side_stream(device).synchronize()
        return loss

    # -- state dict --------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a PagedAdamW or torch.optim.AdamW state dict; large CUDA moments go straight to host."""
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        host_moments: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        slim_state = {}
        for i, s in state_dict.get("state", {}).items():
            slim_state[i] = s
            if i in ids and len(ids) == len(params):
                p = params[ids.index(i)]
                if self.wants_paging(p):
                    host_moments[p] = {k: v for k, v in s.items() if k in _MOMENT_KEYS}
                    slim_state[i] = {k: v for k, v in s.items() if k not in _MOMENT_KEYS}
        super().load_state_dict({**state_dict, "state": slim_state})
        for p, moments in host_moments.items():
            for key, value in moments.items():
                if value.shape != p.shape:
                    raise OptimizerStateError(
                        f"state {key!r} has shape {tuple(value.shape)}, parameter has {tuple(p.shape)}"
                    )
                buf = self._host_buffer(p, p.dtype)
                buf.copy_(value)
                self.state[p][key] = buf


# -- safetensors + JSON serialization of any optimizer's state ------------------------------------


def _encode(value):
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise OptimizerStateError("only scalar tensors may appear in optimizer param_groups")
        return {"__scalar_tensor__": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise OptimizerStateError(f"cannot serialize optimizer hyper-parameter of type {type(value).__name__}: {value!r}")


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__scalar_tensor__" in value:
            return torch.tensor(value["__scalar_tensor__"], dtype=getattr(torch, value["dtype"]))
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten ``optimizer.state_dict()`` into CPU tensors keyed ``state.<index>.<name>`` plus JSON.

    Returns ``(tensors, meta)``: ``tensors`` can be written with safetensors; ``meta`` (param groups
    and non-tensor state values) with ``json.dump``. :func:`optimizer_state_from_tensors` inverts it.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[name] = _encode(value)
    meta = {"format": 1, "param_groups": _encode(sd["param_groups"]), "scalars": scalars}
    return tensors, meta


def optimizer_state_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Load what :func:`optimizer_state_to_tensors` produced into ``optimizer``."""
    if not isinstance(meta, dict) or "param_groups" not in meta:
        raise OptimizerStateError(
            f"optimizer metadata must be a JSON object with 'param_groups', got {str(meta)[:200]}"
        )
    groups = _decode(meta["param_groups"])
    if len(groups) != len(optimizer.param_groups):
        raise OptimizerStateError(
            f"saved state has {len(groups)} parameter groups, the optimizer has {len(optimizer.param_groups)}"
        )
    for saved, current in zip(groups, optimizer.param_groups, strict=True):
        if len(saved["params"]) != len(current["params"]):
            raise OptimizerStateError(
                f"a saved parameter group has {len(saved['params'])} parameters, "
                f"the optimizer's has {len(current['params'])}"
            )
    valid_ids = {i for g in groups for i in g["params"]}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise OptimizerStateError(f"unexpected tensor key {key!r} (expected 'state.<index>.<name>')")
        if int(parts[1]) not in valid_ids:
            raise OptimizerStateError(f"tensor {key!r} refers to parameter {parts[1]}, which no group holds")
        state.setdefault(int(parts[1]), {})[parts[2]] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(_decode(values))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    for i, p in zip(ids, params, strict=True):
        for name, value in state.get(i, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise OptimizerStateError(
                    f"state.{i}.{name} has shape {tuple(value.shape)}, its parameter has {tuple(p.shape)}"
                )
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Write the optimizer's state to one safetensors file (JSON in its metadata), atomically."""
    tensors, meta = optimizer_state_to_tensors(optimizer)
    files.write_safetensors(path, tensors, metadata={_META_KEY: json.dumps(meta)})


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Load a file written by :func:`save_optimizer_state`; raise OptimizerStateError if it is unusable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OptimizerStateError(f"optimizer state file {path!r} does not exist")
    try:
        metadata = files.read_safetensors_metadata(path)
        tensors = files.read_safetensors(path)
    except files.FileFormatError as err:
        raise OptimizerStateError(f"{path} is not a readable safetensors file: {err}") from err
    if _META_KEY not in metadata:
        raise OptimizerStateError(f"{path} has no {_META_KEY!r} metadata; it was not written by save_optimizer_state")
    try:
        meta = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as err:
        raise OptimizerStateError(f"{path}: optimizer metadata is not valid JSON: {err}") from err
    optimizer_state_from_tensors(optimizer, tensors, meta)
