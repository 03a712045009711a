"""``LinearNF4``: a frozen linear layer whose weight is stored in 4 bits (bitsandbytes' NF4/FP4 layout).

Building one: ``LinearNF4(weight, bias)`` from an :class:`~lowrank.nf4_format.NF4Weight` (e.g.
``lowrank.quantize(dense)`` or ``NF4Weight.from_bnb_state_dict(sd, prefix)``) and an optional bias tensor;
``LinearNF4.from_linear(linear)`` quantizes an ``nn.Linear``; ``LinearNF4.from_bnb_state_dict(sd, prefix)``
reads bitsandbytes' keys; ``LinearNF4.empty(out, in, device="meta")`` is a skeleton to load into.

How the tensors are held (what distributed training sees):

* ``weight`` (the packed codes, uint8) and ``weight_absmax`` (the double-quantized uint8 codes, or the fp32
  block constants stored as their raw bytes, uint8) are frozen ``nn.Parameter``s: FSDP2's ``fully_shard``
  shards them like any parameter and all-gathers them around forward and backward; DDP broadcasts
  parameters once at construction and never again; ``model.to(dtype)`` and FSDP2's mixed precision cast
  only floating-point parameters, so neither touches them.
* ``weight_nested_absmax`` / ``weight_nested_offset`` (double quantization: ``ceil(nb / 256)`` + 1 fp32
  values, about n / 16384 floats) are buffers: never cast (see :meth:`LinearNF4._apply`), replicated.

``state_dict()`` writes exactly the keys of bitsandbytes' ``Linear4bit`` (``weight``, ``bias``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``) and ``load_state_dict`` reads them, validated; both also work on
a module sharded by ``fully_shard`` (DTensor shards in, the right shard copied into each rank's
parameters), and ``torch.distributed.checkpoint.state_dict`` finds its way through these keys
(``_fqn_modifiers``). The JSON blob's length depends on the stored nested offset, so it is a
:class:`QuantStateBlob`: a plain uint8 tensor to everything but DCP, which saves it as one pickled object and
loads whatever length was saved (a model whose 4-bit base differs loads a checkpoint). See ``docs/weight.md``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank import nf4
from lowrank.nf4_format import BNB_BLOB_SUFFIX, NF4Weight, is_bnb_weight_key
from lowrank.ops import lora as lora_ops

try:  # DTensor: what fully_shard turns parameters into (absent only in torch builds without distributed)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - every supported torch has it
    DTensor = None

# Buffers that must stay fp32 whatever dtype the module is cast to (their values define the bytes' meaning).
_FP32_CONSTANTS = ("weight_nested_absmax", "weight_nested_offset")
#: This module's own storage names, which torch.distributed.checkpoint also passes to load_state_dict.
_STORAGE = ("weight", "weight_absmax", *_FP32_CONSTANTS)


class _BnbKeys:
    """What ``torch.distributed.checkpoint``'s ``getattr`` walk finds for bitsandbytes' keys under ``weight``
    (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...): they name no attribute of the packed
    parameter, so :meth:`LinearNF4._fqn_modifiers` redirects the walk here."""

    class weight:  # noqa: N801 - the attribute name the walk asks for
        absmax = quant_map = nested_absmax = nested_quant_map = None

        class quant_state:  # noqa: N801
            bitsandbytes__nf4 = bitsandbytes__fp4 = None


class QuantStateBlob(torch.Tensor):
    """bitsandbytes' ``weight.quant_state.bitsandbytes__<nf4|fp4>`` entry (UTF-8 JSON bytes, uint8 1-D) as
    ``LinearNF4.state_dict()`` returns it: the same bytes as bitsandbytes', but its length depends on the
    nested offset written into it as text, so two models of one architecture differ in size there.

    ``torch.distributed.checkpoint`` would save it as a tensor and refuse to load it into a model whose blob has
    another length ("Size mismatch"). ``__create_write_items__`` (DCP's hook, the one DTensor implements) makes
    DCP save it as a single pickled object instead; DCP loads such an object whatever the target holds and
    puts the saved one into the state dict, which ``load_state_dict`` / ``set_model_state_dict`` then parse.
    Everything else sees a plain uint8 tensor: it pickles as one (``torch.save``, loadable with
    ``weights_only=True``), deep-copies, and safetensors writes its bytes. Ops on it return this class too
    (torch's default ``__torch_function__``), so the copy DCP's ``cpu_offload`` makes keeps the behaviour.
    """

    @staticmethod
    def wrap(raw: torch.Tensor) -> QuantStateBlob:
        return raw.as_subclass(QuantStateBlob)

    def __create_write_items__(self, fqn: str, obj: object) -> list:
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)]

    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        return QuantStateBlob.wrap(self.as_subclass(torch.Tensor).clone())


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor shard is all-gathered (every rank takes part), anything else is itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.contiguous().view(torch.uint8)


def _from_bytes(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return raw
    if raw.storage_offset() * raw.element_size() % dtype.itemsize or not raw.is_contiguous():
        raw = raw.contiguous().clone()  # a view needs an aligned start; an all-gathered tensor has one
    return raw.view(dtype)


class LinearNF4(nn.Module):
    """``y = x·dequant(W)ᵀ + bias`` with W frozen in 4 bits; x (..., in) -> y (..., out) in x's dtype.

    ``compute_dtype`` (None = the input's dtype) is the dtype of the matmul, like bitsandbytes'
    ``bnb_4bit_compute_dtype``. The backward re-dequantizes W (no dense copy is kept) and never produces
    a gradient for it; ``bias`` is a Parameter, frozen by default. ``backend`` (attribute, default None =
    auto) picks the dequantize backend.
    """

    #: The parameters holding the 4-bit bytes (frozen, uint8; not counted as model parameters by summary).
    QUANTIZED_PARAMETERS = ("weight", "weight_absmax")

    def __init__(
        self,
        weight: NF4Weight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"compute_dtype must be None or float32/float16/bfloat16, got {compute_dtype}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.compute_dtype = compute_dtype
        self.backend = backend
        self._set_weight(weight)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> LinearNF4:
        """Quantize ``linear.weight`` (bit-exact with bitsandbytes) and keep its bias. A layer on the meta
        device has no values: the result is a meta skeleton of that layout (see :meth:`empty`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type == "meta":
            return cls.empty(
                linear.out_features,
                linear.in_features,
                linear.bias is not None,
                dtype=linear.weight.dtype,
                blocksize=blocksize,
                double_quant=double_quant,
                quant_type=quant_type,
                compute_dtype=compute_dtype,
                device="meta",
                backend=backend,
            )
        weight = nf4.quantize(linear.weight, blocksize, double_quant, quant_type, backend=backend)
        return cls(weight, None if linear.bias is None else linear.bias.detach(), compute_dtype, backend=backend)

    @classmethod
    def from_bnb_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        prefix: str = "",
        compute_dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> LinearNF4:
        """Build from the tensors a bitsandbytes ``Linear4bit`` (or :meth:`state_dict`) wrote under ``prefix``."""
        weight = NF4Weight.from_bnb_state_dict(sd, prefix=f"{prefix}weight")
        return cls(weight, sd.get(f"{prefix}bias"), compute_dtype, backend=backend)

    @classmethod
    def empty(
        cls,
        out_features: int,
        in_features: int,
        bias: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        backend: str | None = None,
    ) -> LinearNF4:
        """A zero-filled layer of this layout (``device="meta"``: costs no memory), to fill with a state dict
        (``load_state_dict``, ``set_model_state_dict``, DCP) after ``to_empty`` or with ``assign=True``."""
        weight = NF4Weight.empty((out_features, in_features), dtype, blocksize, quant_type, double_quant, device)
        bias_tensor = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        return cls(weight, bias_tensor, compute_dtype, backend=backend)

    def _set_weight(self, weight: NF4Weight) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match ({self.out_features}, {self.in_features})"
            )
        weight = weight.detach()
        self.weight = nn.Parameter(weight.packed, requires_grad=False)
        self.weight_absmax = nn.Parameter(_as_bytes(weight.absmax), requires_grad=False)
        self.register_buffer("weight_nested_absmax", weight.nested_absmax)
        self.register_buffer("weight_nested_offset", weight.nested_offset)
        self.weight_dtype = weight.dtype
        self.blocksize = weight.blocksize
        self.quant_type = weight.quant_type
        self.nested_dtype = weight.nested_dtype

    def set_weight(self, weight: NF4Weight) -> None:
        """Replace the quantized weight (same shape), e.g. after a merge; moves it to this module's device
        (a module on the meta device takes the weight's device)."""
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if self.is_sharded:
            raise RuntimeError("set_weight on a module sharded by fully_shard: load a state dict instead")
        if self.weight.device.type != "meta":
            weight = weight.to(self.weight.device)
        self._set_weight(weight)

    # -- views ----------------------------------------------------------------------------------------

    @property
    def is_sharded(self) -> bool:
        """True while ``fully_shard`` holds this module's parameters as shards (outside its forward)."""
        return _is_dtensor(self.weight)

    @property
    def double_quant(self) -> bool:
        return self.weight_nested_absmax is not None

    @property
    def weight_nf4(self) -> NF4Weight:
        """The quantized weight as an :class:`NF4Weight` sharing this module's tensors (no checks: they were
        validated when they came in). Inside forward under ``fully_shard`` the tensors are the gathered ones."""
        if self.is_sharded:
            raise RuntimeError(
                "this LinearNF4 is sharded by fully_shard; its whole weight exists only inside forward/backward "
                "(use torch.distributed.checkpoint.state_dict.get_model_state_dict for the full tensors)"
            )
        absmax_dtype = torch.uint8 if self.double_quant else torch.float32
        return NF4Weight.trusted(
            self.weight,
            _from_bytes(self.weight_absmax, absmax_dtype),
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.blocksize,
            self.quant_type,
            self.weight_nested_absmax,
            self.weight_nested_offset,
            self.nested_dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (default: the dtype it was quantized from)."""
        return nf4.dequantize(self.weight_nf4, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x if self.compute_dtype is None else x.to(self.compute_dtype)
        return lora_ops.linear_nf4(x_c, self.weight_nf4, self.bias, self.backend).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # -- dtype casts must not touch the quantization constants -------------------------------------------

    def _apply(self, fn, recurse=True):
        # `module.to(torch.bfloat16)` casts every float buffer; the nested constants define what the codes
        # mean, so they keep fp32 and only follow the device. (The uint8 parameters are never cast.)
        keep = {name: getattr(self, name) for name in _FP32_CONSTANTS}
        super()._apply(fn, recurse)
        for name, original in keep.items():
            current = getattr(self, name)
            if original is not None and current is not None and current.dtype != original.dtype:
                setattr(self, name, original.to(current.device))
        return self

    # -- bitsandbytes-compatible state dict -----------------------------------------------------------

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint resolves each state-dict key by getattr from the root; bitsandbytes'
        # keys below `weight` are found on _BnbKeys (see there).
        return {"weight": "_bnb_keys"}

    _bnb_keys = _BnbKeys

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        packed = self.weight if keep_vars else self.weight.detach()
        absmax = self.weight_absmax if keep_vars else self.weight_absmax.detach()
        if not self.double_quant:  # fp32 constants held as bytes: whole (gathered when sharded), then fp32
            absmax = _from_bytes(_full(absmax), torch.float32)
        # A sharded module writes its shards (DTensors) for `weight` and the uint8 codes, which
        # get_model_state_dict gathers with full_state_dict=True and DCP saves as shards.
        weight = NF4Weight.trusted(
            packed,
            absmax,
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.blocksize,
            self.quant_type,
            self.weight_nested_absmax,
            self.weight_nested_offset,
            self.nested_dtype,
        )
        sd = weight.to_bnb_state_dict(f"{prefix}weight")
        blob_key = f"{prefix}weight{BNB_BLOB_SUFFIX}{self.quant_type}"
        sd[blob_key] = QuantStateBlob.wrap(sd[blob_key])
        destination[f"{prefix}weight"] = sd.pop(f"{prefix}weight")
        if self.bias is not None:
            destination[f"{prefix}bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(sd)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = [k for k in state_dict if k.startswith(prefix)]  # this module has no children
        if f"{prefix}weight" not in state_dict:
            missing_keys.append(f"{prefix}weight")
        else:
            entries = {
                k: _full(state_dict[k])
                for k in ours
                if k == f"{prefix}weight" or is_bnb_weight_key(k[len(f"{prefix}weight") :])
            }
            try:
                weight = NF4Weight.from_bnb_state_dict(entries, prefix=f"{prefix}weight")
                if self.is_sharded:
                    self._load_shards(weight)
                else:
                    self.set_weight(weight)
            except (ValueError, RuntimeError) as err:  # QuantStateError, shape or layout mismatches
                error_msgs.append(f"{prefix}weight: {err}")
        bias_key = f"{prefix}bias"
        if self.bias is not None:
            if bias_key not in state_dict:
                missing_keys.append(bias_key)
            elif state_dict[bias_key].shape != self.bias.shape:
                error_msgs.append(
                    f"{bias_key}: shape {tuple(state_dict[bias_key].shape)} != expected {tuple(self.bias.shape)}"
                )
            elif self.bias.is_meta:  # a skeleton takes the loaded values
                self.bias = nn.Parameter(_full(state_dict[bias_key]).detach().clone(), self.bias.requires_grad)
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
        known = {f"{prefix}weight", bias_key if self.bias is not None else None}
        known.update(f"{prefix}{name}" for name in _STORAGE)  # what DCP's set_model_state_dict adds
        known.update(k for k in ours if k.startswith(f"{prefix}weight.") and is_bnb_weight_key(k[len(prefix) + 6 :]))
        unexpected_keys.extend(k for k in ours if k not in known)

    @torch.no_grad()
    def _load_shards(self, weight: NF4Weight) -> None:
        """Copy ``weight`` (whole, validated) into this rank's shards of the parameters, and the buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):  # equal byte counts do not make it fit
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match ({self.out_features}, {self.in_features})"
            )
        layout = (weight.blocksize, weight.double_quant, weight.quant_type)
        if layout != (self.blocksize, self.double_quant, self.quant_type):
            raise ValueError(
                f"a sharded LinearNF4 cannot change its layout (blocksize, double_quant, quant_type) from "
                f"{(self.blocksize, self.double_quant, self.quant_type)} to {layout}; load before fully_shard"
            )
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        for name, full in (("weight", weight.packed), ("weight_absmax", _as_bytes(weight.absmax))):
            param = getattr(self, name)
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            local = param.to_local()
            piece = full.reshape(param.shape)[offset[0] : offset[0] + shape[0]]
            local.copy_(piece.to(local.device))
        for name in _FP32_CONSTANTS:
            current, value = getattr(self, name), getattr(weight, name.removeprefix("weight_"))
            if current is not None:
                current.copy_(value.to(current.device))
        self.weight_dtype = weight.dtype
        self.nested_dtype = weight.nested_dtype
