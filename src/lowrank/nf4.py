"""Public NF4 / FP4 API: :func:`quantize`, :func:`dequantize` and the :class:`NF4Weight` container.

The format is bitsandbytes' (bytes, constants and serialized state dict), computed by lowrank's own
kernels; see ``lowrank.kernels.nf4`` for the math and the README for the guarantees.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from lowrank.kernels import nf4 as K

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _ops():
    # Imported on first use: lowrank.ops imports NF4Weight from this module, so importing it at the
    # top would be circular.
    from lowrank.ops import dispatch
    from lowrank.ops import nf4 as ops

    return dispatch, ops


class QuantStateError(ValueError):
    """A serialized 4-bit state is missing tensors, corrupted or inconsistent."""


@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """A frozen 4-bit quantized tensor in bitsandbytes' layout.

    Attributes:
        packed: uint8 ``((n + 1) // 2, 1)``, two codes per byte, first element in the high nibble.
        absmax: per-block constants: fp32 ``[nb]``, or uint8 ``[nb]`` codes when double-quantized.
        shape: the original tensor's shape; ``dtype``: its dtype (the default dequantization dtype).
        blocksize: elements per block of the flattened tensor; ``quant_type``: ``"nf4"`` or ``"fp4"``.
        nested_absmax: fp32 ``[ceil(nb / 256)]`` scales of the double quantization (else None).
        nested_offset: fp32 0-dim mean subtracted before the double quantization (else None).
        nested_dtype: the dtype the block constants are reconstructed in. float32 for everything lowrank
            quantizes; a bitsandbytes state that says ``"nested_dtype": "bfloat16"`` (transformers writes
            that) keeps it, and dequantization then rounds like bitsandbytes (see ``lowrank.kernels.nf4``).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    nested_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        self.validate()

    # -- derived facts ------------------------------------------------------------------------------

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes and constants (the code tables are shared and not counted)."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.nested_offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of this weight by field name (for moving, sharding or registering as buffers)."""
        names = ("packed", "absmax", "nested_absmax", "nested_offset")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to(self, device: torch.device | str) -> NF4Weight:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    def validate(self) -> None:
        """Check that the fields describe a consistent quantized tensor; raise QuantStateError if not."""
        if self.quant_type not in K.QUANT_TYPES:
            raise QuantStateError(f"quant_type must be one of {K.QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in K.BLOCKSIZES:
            raise QuantStateError(f"blocksize must be one of {K.BLOCKSIZES}, got {self.blocksize!r}")
        if self.dtype not in K.FLOAT_DTYPES:
            raise QuantStateError(f"dtype must be float32/float16/bfloat16, got {self.dtype}")
        if self.nested_dtype not in K.NESTED_DTYPES:
            raise QuantStateError(f"nested_dtype must be float32/float16/bfloat16, got {self.nested_dtype}")
        for name in ("packed", "absmax", "nested_absmax", "nested_offset"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.Tensor):
                raise QuantStateError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        devices = {name: t.device for name, t in self.tensors().items()}
        if len(set(devices.values())) != 1:
            listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
            raise QuantStateError(f"all tensors of an NF4Weight must be on one device, got {listing}")
        check_values = self.packed.device.type != "meta"  # meta tensors have shapes but no values
        if any(d < 0 for d in self.shape):
            raise QuantStateError(f"shape {tuple(self.shape)} has a negative dimension")
        n = self.numel
        if n == 0:
            raise QuantStateError(f"shape {tuple(self.shape)} has no elements")
        nb = K.num_blocks(n, self.blocksize)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise QuantStateError(
                f"packed must be uint8 with {(n + 1) // 2} bytes for shape {tuple(self.shape)}, "
                f"got {self.packed.dtype} with {self.packed.numel()}"
            )
        want_absmax = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want_absmax or self.absmax.numel() != nb:
            raise QuantStateError(
                f"absmax must be {want_absmax} with {nb} entries (blocksize {self.blocksize}), "
                f"got {self.absmax.dtype} with {self.absmax.numel()}"
            )
        if self.double_quant:
            n2 = K.num_blocks(nb, K.NESTED_BLOCKSIZE)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != n2:
                raise QuantStateError(
                    f"nested_absmax must be float32 with {n2} entries, got {self.nested_absmax.dtype} "
                    f"with {self.nested_absmax.numel()}"
                )
            offset = self.nested_offset
            if offset is None or offset.numel() != 1 or offset.dtype != torch.float32:
                got = "None" if offset is None else f"{offset.dtype} with {offset.numel()} elements"
                raise QuantStateError(f"a double-quantized weight needs a one-element float32 nested_offset, got {got}")
            if check_values and not (bool(torch.isfinite(self.nested_absmax).all()) and math.isfinite(float(offset))):
                raise QuantStateError("nested_absmax / nested_offset hold non-finite values")
        else:
            if self.nested_offset is not None:
                raise QuantStateError("nested_offset given without nested_absmax")
            if check_values and not bool(torch.isfinite(self.absmax).all()):
                raise QuantStateError("absmax holds non-finite values")

    # -- bitsandbytes serialization -----------------------------------------------------------------

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors a bitsandbytes ``Linear4bit`` writes for its weight, under ``prefix``.

        Keys: ``prefix``, ``prefix.absmax``, ``prefix.quant_map``, (double quant:) ``prefix.nested_absmax``,
        ``prefix.nested_quant_map``, and ``prefix.quant_state.bitsandbytes__<quant_type>`` (UTF-8 JSON).
        """
        blob = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        sd = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": K.code_table(self.quant_type, self.device),
        }
        if self.double_quant:
            blob.update(
                nested_blocksize=K.NESTED_BLOCKSIZE,
                nested_dtype=_DTYPE_NAMES[self.nested_dtype],
                nested_offset=self.nested_offset.item(),
            )
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = K.dynamic_map(self.device)
        raw = json.dumps(blob).encode("utf-8")
        sd[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(
            bytearray(raw), dtype=torch.uint8
        ).to(self.device)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
        """Read the tensors written by :meth:`to_bnb_state_dict` or by a bitsandbytes ``Linear4bit``.

        Accepts any ``quant_storage`` (the packed bytes are reinterpreted as uint8) and the
        transformers variant whose blob says ``"nested_dtype": "bfloat16"``. Raises
        :class:`QuantStateError` naming the key when something is missing, corrupted or inconsistent
        (a truncated packed tensor, a JSON blob that does not parse, a wrong code table, ...).
        """
        blob_prefix = f"{prefix}.quant_state.bitsandbytes__"
        blob_keys = [k for k in sd if k.startswith(blob_prefix)]
        if len(blob_keys) != 1:
            raise QuantStateError(f"expected exactly one '{blob_prefix}<nf4|fp4>' entry, found {blob_keys or 'none'}")
        blob_key = blob_keys[0]
        blob = _read_json_blob(blob_key, sd[blob_key])
        missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in blob]
        if missing:
            raise QuantStateError(f"{blob_key} lacks the fields {missing}")
        quant_type = blob["quant_type"]
        if quant_type not in K.QUANT_TYPES:
            raise QuantStateError(f"{blob_key}: quant_type {quant_type!r} is not one of {K.QUANT_TYPES}")
        if blob_key[len(blob_prefix) :] != quant_type:
            raise QuantStateError(f"{blob_key} says quant_type {quant_type!r}, which does not match its key")
        dtype = _dtype_field(blob_key, blob, "dtype")
        blocksize = blob["blocksize"]
        if isinstance(blocksize, bool) or blocksize not in K.BLOCKSIZES:
            raise QuantStateError(f"{blob_key}: blocksize {blocksize!r} is not one of {K.BLOCKSIZES}")
        shape = blob["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise QuantStateError(f"{blob_key}: shape must be a list of non-negative ints, got {shape!r}")

        def tensor(name: str) -> torch.Tensor:
            key = f"{prefix}{name}"
            if key not in sd:
                raise QuantStateError(f"missing tensor {key!r} (have {sorted(k for k in sd if k.startswith(prefix))})")
            if not isinstance(sd[key], torch.Tensor):
                raise QuantStateError(f"{key!r} must be a tensor, got {type(sd[key]).__name__}")
            return sd[key]

        packed = tensor("")
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage only reinterprets the bytes
            packed = packed.contiguous().reshape(-1).view(torch.uint8)
        packed = packed.reshape(-1, 1)
        quant_map = tensor(".quant_map")
        if quant_map.dtype != torch.float32 or not torch.equal(quant_map.cpu().reshape(-1), K.code_table(quant_type)):
            raise QuantStateError(f"{prefix}.quant_map is not the standard {quant_type} code table")
        nested = "nested_offset" in blob or f"{prefix}.nested_absmax" in sd
        nested_absmax = nested_offset = None
        nested_dtype = torch.float32
        if nested:
            absent = [k for k in ("nested_offset", "nested_blocksize", "nested_dtype") if k not in blob]
            if absent:
                raise QuantStateError(f"{blob_key} describes a double-quantized weight but lacks {absent}")
            if blob["nested_blocksize"] != K.NESTED_BLOCKSIZE:
                raise QuantStateError(f"{blob_key}: nested_blocksize must be 256, got {blob['nested_blocksize']!r}")
            nested_dtype = _dtype_field(blob_key, blob, "nested_dtype")
            nested_quant_map = tensor(".nested_quant_map")
            if nested_quant_map.dtype != torch.float32 or not torch.equal(
                nested_quant_map.cpu().reshape(-1), K.dynamic_map()
            ):
                raise QuantStateError(f"{prefix}.nested_quant_map is not the signed 8-bit dynamic map")
            nested_absmax = tensor(".nested_absmax")
            offset = blob["nested_offset"]
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise QuantStateError(f"{blob_key}: nested_offset must be a finite number, got {offset!r}")
            nested_offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
        try:
            return cls(
                packed=packed,
                absmax=tensor(".absmax"),
                shape=torch.Size(shape),
                dtype=dtype,
                blocksize=blocksize,
                quant_type=quant_type,
                nested_absmax=nested_absmax,
                nested_offset=nested_offset,
                nested_dtype=nested_dtype,
            )
        except QuantStateError as err:
            raise QuantStateError(f"inconsistent 4-bit state under {prefix!r}: {err}") from err


def _read_json_blob(key: str, raw: object) -> dict:
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        got = f"{raw.dtype} tensor" if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise QuantStateError(f"{key} must be a uint8 tensor of UTF-8 JSON bytes, got a {got}")
    try:
        blob = json.loads(raw.cpu().reshape(-1).numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantStateError(f"{key} is not valid UTF-8 JSON: {err}") from err
    if not isinstance(blob, dict):
        raise QuantStateError(f"{key} must hold a JSON object, got {type(blob).__name__}")
    return blob


def _dtype_field(key: str, blob: dict, field: str) -> torch.dtype:
    name = blob[field]
    if name not in _DTYPES_BY_NAME:
        raise QuantStateError(f"{key}: {field} {name!r} is not one of {sorted(_DTYPES_BY_NAME)}")
    return _DTYPES_BY_NAME[name]


def quantize(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    backend: str | None = None,
) -> NF4Weight:
    """Quantize ``w`` (any shape, fp32/fp16/bf16) to 4 bits in bitsandbytes' format.

    ``backend``: ``None``/``"auto"`` picks per device; ``"torch"``, ``"triton"`` or ``"ext"`` forces one
    (and raises if it cannot run here). Non-finite values and empty tensors are rejected.
    """
    K.check_float_input(w, "weight")
    K.check_blocksize(blocksize)
    K.check_quant_type(quant_type)
    if w.device.type == "meta":
        raise ValueError(f"weight of shape {tuple(w.shape)} is on the meta device: it has no values to quantize")
    # aminmax is one vectorised reduction that propagates NaN and shows ±inf in its extremes: on CPU it
    # costs ~1/50 of isfinite(w).all(); the full scan runs only to name the first bad element.
    lowest, highest = torch.aminmax(w)
    if not bool(torch.isfinite(lowest) & torch.isfinite(highest)):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(
            f"weight has non-finite values (first at index {bad}: {w[tuple(bad)].item()}); cannot quantize"
        )
    dispatch, ops = _ops()
    name = dispatch.resolve("quantize_4bit", w.device, backend)
    packed, absmax = ops.quantize_4bit_op(w, blocksize, quant_type, name)
    nested_absmax = offset = None
    if double_quant:
        dq = dispatch.resolve("double_quantize", w.device, backend)
        absmax, nested_absmax, offset = ops.double_quantize_op(absmax, dq)
    return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize, quant_type, nested_absmax, offset)


def dequantize(
    qw: NF4Weight, dtype: torch.dtype | None = None, backend: str | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Reconstruct the tensor in ``dtype`` (default: ``out``'s dtype, else the original dtype), in the
    original shape. With ``out`` (contiguous, that shape and dtype, on ``qw``'s device) the result is written
    there and ``out`` is returned: reusing one buffer skips the allocation (on CPU, its page faults cost
    several times the decode)."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"dequantize expects an NF4Weight, got {type(qw).__name__}")
    if dtype is None:
        dtype = out.dtype if isinstance(out, torch.Tensor) else qw.dtype
    if dtype not in K.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32/float16/bfloat16, got {dtype}")
    if out is not None:
        K.check_dequantize_out(out, qw.shape, dtype, qw.device)
    dispatch, ops = _ops()
    name = dispatch.resolve("dequantize_4bit", qw.device, backend)
    args = (qw.packed, qw.absmax, qw.nested_absmax, qw.nested_offset)
    if torch.compiler.is_compiling():
        result = ops.dequantize_4bit_op(
            *args, list(qw.shape), dtype, qw.blocksize, qw.quant_type, name, qw.nested_dtype
        )
        return result if out is None else out.copy_(result)
    # Eager calls launch the implementation directly: the torch.library dispatcher costs tens of
    # microseconds per call, as much as the whole kernel for a 4096x4096 weight on an H100.
    impl = dispatch.implementation("dequantize_4bit", name)
    with torch.no_grad():
        if out is None:
            return impl(*args, tuple(qw.shape), dtype, qw.blocksize, qw.quant_type, qw.nested_dtype)
        return impl(*args, tuple(qw.shape), dtype, qw.blocksize, qw.quant_type, qw.nested_dtype, out=out)


def dequantize_absmax(qw: NF4Weight, backend: str | None = None) -> torch.Tensor:
    """The fp32 per-block constants ``[nb]`` of ``qw`` (reconstructed when double-quantized)."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"dequantize_absmax expects an NF4Weight, got {type(qw).__name__}")
    if not qw.double_quant:
        return qw.absmax
    dispatch, ops = _ops()
    name = dispatch.resolve("double_dequantize", qw.device, backend)
    return ops.double_dequantize_op(qw.absmax, qw.nested_absmax, qw.nested_offset, name, qw.nested_dtype)
