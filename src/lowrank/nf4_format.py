"""The NF4 / FP4 format: code tables, checks and :class:`NF4Weight`, the one owner of a quantized tensor.

This module is the bottom of lowrank's import graph: it imports torch and :mod:`lowrank.dtypes` only (no
Triton, no ops), so ``lowrank.nf4``, the C++ extension adapter and the public API validate a weight
without loading any kernel. ``lowrank.kernels.nf4`` (references and Triton kernels) and every layer above
take the tables and checks from here.

Format (bitsandbytes' bytes, constants and serialized state dict; the math is in ``docs/nf4.md``)
-------------------------------------------------------------------------------------------------
* ``packed``: uint8 ``((n + 1) // 2, 1)``, two 4-bit codes per byte, the first element in the high nibble.
* ``absmax``: one constant per block of ``blocksize`` elements of the flattened tensor: fp32 ``[nb]``, or,
  double-quantized, uint8 ``[nb]`` codes of the signed 8-bit dynamic map in blocks of 256 around their mean.
* ``nested_absmax``: fp32 ``[ceil(nb / 256)]`` scales of that second level; ``nested_offset``: the fp32 0-dim
  mean; ``nested_dtype``: the dtype the constants are reconstructed in (fp32 for what lowrank writes).

The names above are the one vocabulary for these tensors everywhere in lowrank (bitsandbytes' state-dict
keys use the same words: ``weight.absmax``, ``weight.nested_absmax``, ``nested_offset`` in the JSON blob).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import torch

from lowrank.dtypes import DTYPE_NAMES, DTYPES_BY_NAME

# ----------------------------------------------------------------------------------------------------
# Constants: the single source of truth for the code tables.
# ----------------------------------------------------------------------------------------------------

#: The 16 NF4 values, index = 4-bit code (ascending; code 7 is exactly 0.0).
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: The 16 FP4 (e2m1, bitsandbytes variant) values in bit-pattern order: bit 3 is the sign.
#: Code 8 is +0.0 (not -0.0), as in bitsandbytes' table, so dequantized zeros match bit for bit.
FP4_CODE: tuple[float, ...] = tuple(
    sign * m / 12.0 if m else 0.0 for sign in (1.0, -1.0) for m in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Smallest divisor of a block's reciprocal (bitsandbytes' clamp; stored in fp32 as 9.99999935e-39).
RECIPROCAL_FLOOR = 1e-38
#: Same for the nested 256-blocks: the smallest normal fp32, so 1 / nested_absmax never overflows.
NESTED_RECIPROCAL_FLOOR = torch.finfo(torch.float32).tiny
#: Dtypes a serialized nested state may name (bitsandbytes reconstructs the constants in it).
NESTED_DTYPES = FLOAT_DTYPES

#: Code of 0.0, used for the padding nibble of an odd element count and for all-zero blocks.
ZERO_CODE = {"nf4": 7, "fp4": 0}


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 value table of ``quant_type`` (index = code)."""
    check_quant_type(quant_type)
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)


@functools.cache
def _sorted_table(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted values, fp32 midpoints between neighbours, code of each sorted position), on CPU.

    A stable sort keeps FP4's +0.0 (code 0) before -0.0 (code 8), which is what bitsandbytes' CPU
    path does: 0 < s <= 0.0026 becomes code 8 and s == 0 becomes code 0.
    """
    table = code_table(quant_type)
    values, order = torch.sort(table, stable=True)
    return values, (values[:-1] + values[1:]) / 2, order.to(torch.uint8)


def thresholds(quant_type: str) -> tuple[float, ...]:
    """The 15 fp32 decision thresholds (as Python floats that are exactly representable in fp32)."""
    return tuple(_sorted_table(quant_type)[1].tolist())


def sorted_codes(quant_type: str) -> tuple[int, ...]:
    """Code of the table entry at each sorted position (identity for NF4)."""
    return tuple(_sorted_table(quant_type)[2].tolist())


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # The signed 8-bit dynamic map (bitsandbytes' create_dynamic_map(signed=True, 7 exponent bits)):
    # for each decade i = 0..6, the means of neighbouring points of linspace(0.1, 1, 2**i + 1),
    # scaled by 10**(i - 6), with both signs; then 0 and 1.0; sorted. 256 values, range [-0.993, 1].
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry signed dynamic map used for the nested (double) quantization, fp32 (a fresh tensor:
    callers may keep or modify it without touching the cached table)."""
    return _dynamic_map_cpu().to(device, copy=True)


@functools.cache
def _dynamic_midpoints_cpu() -> torch.Tensor:
    dyn = _dynamic_map_cpu()
    return (dyn[:-1] + dyn[1:]) / 2


# ----------------------------------------------------------------------------------------------------
# Checks: every entry point where untrusted tensors come in calls these; hot paths do not.
# ----------------------------------------------------------------------------------------------------


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def check_float_input(x: torch.Tensor, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} dtype must be one of float32/float16/bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); there is nothing to quantize")


def check_dequantize_out(out: torch.Tensor, shape, dtype: torch.dtype, device: torch.device) -> None:
    """A caller's output buffer must be exactly what the dequantization would return, and contiguous."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device):
        raise ValueError(
            f"out must be a {dtype} tensor of shape {tuple(shape)} on {device}, "
            f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()} for shape {tuple(out.shape)}")
    if out.requires_grad:
        raise ValueError("out must not require grad (dequantization writes it in place)")


def check_layout(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    shape,
    blocksize: int,
    check_values: bool = False,
) -> int:
    """The one check that four tensors describe a quantized tensor of ``shape``; returns its element count.

    Raises :class:`QuantStateError` (a ValueError) naming the tensor and what was expected. With
    ``check_values`` the constants must also be finite (a scan of the small tensors only).
    """
    for name, value in (("packed", packed), ("absmax", absmax), ("nested_absmax", nested_absmax)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise QuantStateError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if nested_offset is not None and not isinstance(nested_offset, torch.Tensor):
        raise QuantStateError(f"nested_offset must be a torch.Tensor, got {type(nested_offset).__name__}")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise QuantStateError(f"shape must be a sequence of non-negative ints, got {tuple(shape)}")
    n = math.prod(shape)
    if n == 0:
        raise QuantStateError(f"shape {tuple(shape)} has no elements")
    nb = num_blocks(n, blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise QuantStateError(
            f"packed must be uint8 with {(n + 1) // 2} bytes for shape {tuple(shape)}, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    double_quant = nested_absmax is not None
    want = torch.uint8 if double_quant else torch.float32
    if absmax.dtype != want or absmax.numel() != nb:
        raise QuantStateError(
            f"absmax must be {want} with {nb} entries (shape {tuple(shape)}, blocksize {blocksize}), "
            f"got {absmax.dtype} with {absmax.numel()}"
        )
    if double_quant:
        n2 = num_blocks(nb, NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != n2:
            raise QuantStateError(
                f"nested_absmax must be float32 with {n2} entries, got {nested_absmax.dtype} "
                f"with {nested_absmax.numel()}"
            )
        if nested_offset is None or nested_offset.numel() != 1 or nested_offset.dtype != torch.float32:
            got = "None" if nested_offset is None else f"{nested_offset.dtype} with {nested_offset.numel()} elements"
            raise QuantStateError(f"a double-quantized weight needs a one-element float32 nested_offset, got {got}")
    elif nested_offset is not None:
        raise QuantStateError("nested_offset given without nested_absmax (double quantization needs both)")
    tensors = {"packed": packed, "absmax": absmax, "nested_absmax": nested_absmax, "nested_offset": nested_offset}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) != 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise QuantStateError(f"all tensors of a 4-bit weight must be on one device, got {listing}")
    if check_values and packed.device.type != "meta":  # meta tensors have shapes but no values
        if double_quant:
            if not (bool(torch.isfinite(nested_absmax).all()) and math.isfinite(float(nested_offset))):
                raise QuantStateError("nested_absmax / nested_offset hold non-finite values")
        elif not bool(torch.isfinite(absmax).all()):
            raise QuantStateError("absmax holds non-finite values")
    return n


def check_dequantize_args(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    blocksize: int,
    quant_type: str,
    nested_dtype: torch.dtype = torch.float32,
) -> int:
    """Validate a dequantization request given as loose tensors (the launchers' entry); returns the count."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"output dtype must be one of float32/float16/bfloat16, got {dtype}")
    if nested_dtype not in NESTED_DTYPES:
        raise TypeError(f"nested_dtype must be one of float32/float16/bfloat16, got {nested_dtype}")
    return check_layout(packed, absmax, nested_absmax, nested_offset, tuple(shape), blocksize)


def check_nested_args(
    qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_offset: torch.Tensor, nested_dtype: torch.dtype
) -> None:
    """Validate double-quantized block constants (uint8 codes, fp32 scales per 256, fp32 nested offset)."""
    if nested_dtype not in NESTED_DTYPES:
        raise TypeError(f"nested_dtype must be one of float32/float16/bfloat16, got {nested_dtype}")
    if qabsmax.dtype != torch.uint8 or qabsmax.dim() != 1 or qabsmax.numel() == 0:
        raise ValueError(
            f"qabsmax must be a non-empty 1-D uint8 tensor, got {qabsmax.dtype} of shape {tuple(qabsmax.shape)}"
        )
    n2 = num_blocks(qabsmax.numel(), NESTED_BLOCKSIZE)
    if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != n2:
        raise ValueError(
            f"nested_absmax must be float32 with {n2} entries, got {nested_absmax.dtype} with {nested_absmax.numel()}"
        )
    if nested_offset.dtype != torch.float32 or nested_offset.numel() != 1:
        raise ValueError(
            f"nested_offset must be a one-element float32 tensor, got {nested_offset.dtype} "
            f"with {nested_offset.numel()}"
        )
    devices = (qabsmax.device, nested_absmax.device, nested_offset.device)
    if len(set(devices)) != 1:
        raise ValueError(
            f"qabsmax, nested_absmax and nested_offset must share a device, got {', '.join(map(str, devices))}"
        )


def check_absmax_for_double_quant(absmax: torch.Tensor) -> None:
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() == 0:
        raise ValueError(
            f"absmax must be a non-empty 1-D float32 tensor, got {absmax.dtype} of shape {tuple(absmax.shape)}"
        )


def num_blocks(numel: int, blocksize: int) -> int:
    return (numel + blocksize - 1) // blocksize


def packed_shape(numel: int) -> tuple[int, int]:
    return ((numel + 1) // 2, 1)


# ----------------------------------------------------------------------------------------------------
# The quantized weight.
# ----------------------------------------------------------------------------------------------------


class QuantStateError(ValueError):
    """A 4-bit state (tensors, a state dict, a file) is missing tensors, corrupted or inconsistent."""


#: The tensor fields of a quantized weight, in the order every op, launcher and the extension take them.
TENSOR_FIELDS = ("packed", "absmax", "nested_absmax", "nested_offset")


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Weight:
    """A frozen 4-bit quantized tensor in bitsandbytes' layout: the one owner of its tensors and metadata.

    Attributes:
        packed: uint8 ``((n + 1) // 2, 1)``, two codes per byte, first element in the high nibble.
        absmax: per-block constants: fp32 ``[nb]``, or uint8 ``[nb]`` codes when double-quantized.
        shape: the original tensor's shape; ``dtype``: its dtype (the default dequantization dtype).
        blocksize: elements per block of the flattened tensor; ``quant_type``: ``"nf4"`` or ``"fp4"``.
        nested_absmax: fp32 ``[ceil(nb / 256)]`` scales of the double quantization (else None).
        nested_offset: fp32 0-dim mean subtracted before the double quantization (else None).
        nested_dtype: the dtype the block constants are reconstructed in. float32 for everything lowrank
            quantizes; a bitsandbytes state that says ``"nested_dtype": "bfloat16"`` (transformers writes
            that) keeps it, and dequantization then rounds like bitsandbytes.

    Constructing one validates it (``NF4Weight(...)``, :meth:`from_bnb_state_dict`, unpickling): that is
    where untrusted tensors come in. :meth:`trusted` builds one without checks, for tensors validated
    before (a module's own parameters on every forward). Equality compares metadata and tensor values.
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

    @classmethod
    def trusted(
        cls,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape,
        dtype: torch.dtype,
        blocksize: int,
        quant_type: str,
        nested_absmax: torch.Tensor | None = None,
        nested_offset: torch.Tensor | None = None,
        nested_dtype: torch.dtype = torch.float32,
    ) -> NF4Weight:
        """The same object without validation (hot paths; the caller vouches for the tensors)."""
        self = object.__new__(cls)
        object.__setattr__(self, "packed", packed)
        object.__setattr__(self, "absmax", absmax)
        object.__setattr__(self, "shape", torch.Size(shape))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "blocksize", blocksize)
        object.__setattr__(self, "quant_type", quant_type)
        object.__setattr__(self, "nested_absmax", nested_absmax)
        object.__setattr__(self, "nested_offset", nested_offset)
        object.__setattr__(self, "nested_dtype", nested_dtype)
        return self

    @classmethod
    def empty(
        cls,
        shape,
        dtype: torch.dtype = torch.float32,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        device: torch.device | str = "cpu",
    ) -> NF4Weight:
        """Zero-filled tensors of the right sizes (``device="meta"``: a skeleton that a state dict fills)."""
        check_blocksize(blocksize)
        check_quant_type(quant_type)
        n = math.prod(shape)
        nb = num_blocks(n, blocksize)
        packed = torch.zeros(packed_shape(n), dtype=torch.uint8, device=device)
        if double_quant:
            absmax = torch.zeros(nb, dtype=torch.uint8, device=device)
            nested_absmax = torch.zeros(num_blocks(nb, NESTED_BLOCKSIZE), dtype=torch.float32, device=device)
            nested_offset = torch.zeros((), dtype=torch.float32, device=device)
        else:
            absmax = torch.zeros(nb, dtype=torch.float32, device=device)
            nested_absmax = nested_offset = None
        return cls(packed, absmax, shape, dtype, blocksize, quant_type, nested_absmax, nested_offset)

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
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of this weight by field name (absent ones left out)."""
        return {name: getattr(self, name) for name in TENSOR_FIELDS if getattr(self, name) is not None}

    def _with_tensors(self, fn) -> NF4Weight:
        new = {name: fn(t) for name, t in self.tensors().items()}
        return NF4Weight.trusted(**{**self._fields(), **new})

    def _fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to(self, device: torch.device | str) -> NF4Weight:
        """The same weight on ``device`` (dtypes never change: codes and constants keep their meaning)."""
        return self._with_tensors(lambda t: t.to(device))

    def detach(self) -> NF4Weight:
        return self._with_tensors(torch.Tensor.detach)

    def clone(self) -> NF4Weight:
        return self._with_tensors(lambda t: t.detach().clone())

    def validate(self) -> None:
        """Check that the fields describe a consistent quantized tensor; raise QuantStateError if not."""
        if self.quant_type not in QUANT_TYPES:
            raise QuantStateError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise QuantStateError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise QuantStateError(f"dtype must be float32/float16/bfloat16, got {self.dtype}")
        if self.nested_dtype not in NESTED_DTYPES:
            raise QuantStateError(f"nested_dtype must be float32/float16/bfloat16, got {self.nested_dtype}")
        if any(d < 0 for d in self.shape):
            raise QuantStateError(f"shape {tuple(self.shape)} has a negative dimension")
        check_layout(self.packed, self.absmax, self.nested_absmax, self.nested_offset, self.shape, self.blocksize, True)

    # -- value semantics ----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NF4Weight):
            return NotImplemented
        meta = ("shape", "dtype", "blocksize", "quant_type", "nested_dtype")
        if any(getattr(self, name) != getattr(other, name) for name in meta):
            return False
        for name in TENSOR_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None):
                return False
            if a is not None and (a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b)):
                return False
        return True

    __hash__ = None  # mutable tensors inside: not hashable

    def __setstate__(self, state: dict) -> None:
        # Unpickling (and copy.deepcopy) is an entry point for untrusted data: validate.
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self.validate()

    # -- bitsandbytes serialization -----------------------------------------------------------------

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors a bitsandbytes ``Linear4bit`` writes for its weight, under ``prefix``.

        Keys: ``prefix``, ``prefix.absmax``, ``prefix.quant_map``, (double quant:) ``prefix.nested_absmax``,
        ``prefix.nested_quant_map``, and ``prefix.quant_state.bitsandbytes__<quant_type>`` (UTF-8 JSON).
        """
        blob = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        sd = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": code_table(self.quant_type, self.device),
        }
        if self.double_quant:
            blob.update(
                nested_blocksize=NESTED_BLOCKSIZE,
                nested_dtype=DTYPE_NAMES[self.nested_dtype],
                nested_offset=self.nested_offset.item(),
            )
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = dynamic_map(self.device)
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
        if quant_type not in QUANT_TYPES:
            raise QuantStateError(f"{blob_key}: quant_type {quant_type!r} is not one of {QUANT_TYPES}")
        if blob_key[len(blob_prefix) :] != quant_type:
            raise QuantStateError(f"{blob_key} says quant_type {quant_type!r}, which does not match its key")
        dtype = _dtype_field(blob_key, blob, "dtype")
        blocksize = blob["blocksize"]
        if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
            raise QuantStateError(f"{blob_key}: blocksize {blocksize!r} is not one of {BLOCKSIZES}")
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
        if quant_map.dtype != torch.float32 or not torch.equal(quant_map.cpu().reshape(-1), code_table(quant_type)):
            raise QuantStateError(f"{prefix}.quant_map is not the standard {quant_type} code table")
        nested = "nested_offset" in blob or f"{prefix}.nested_absmax" in sd
        nested_absmax = nested_offset = None
        nested_dtype = torch.float32
        if nested:
            absent = [k for k in ("nested_offset", "nested_blocksize", "nested_dtype") if k not in blob]
            if absent:
                raise QuantStateError(f"{blob_key} describes a double-quantized weight but lacks {absent}")
            if blob["nested_blocksize"] != NESTED_BLOCKSIZE:
                raise QuantStateError(f"{blob_key}: nested_blocksize must be 256, got {blob['nested_blocksize']!r}")
            nested_dtype = _dtype_field(blob_key, blob, "nested_dtype")
            nested_quant_map = tensor(".nested_quant_map")
            if nested_quant_map.dtype != torch.float32 or not torch.equal(
                nested_quant_map.cpu().reshape(-1), dynamic_map()
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


#: The state-dict keys under a weight's prefix that :meth:`NF4Weight.to_bnb_state_dict` writes.
BNB_WEIGHT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
BNB_BLOB_SUFFIX = ".quant_state.bitsandbytes__"


def is_bnb_weight_key(suffix: str) -> bool:
    """True for what follows a weight's prefix in bitsandbytes' keys (``".absmax"``, ``".quant_state..."``)."""
    return suffix in BNB_WEIGHT_SUFFIXES or suffix.startswith(BNB_BLOB_SUFFIX)


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
    if name not in DTYPE_NAMES.values():
        raise QuantStateError(f"{key}: {field} {name!r} is not one of {sorted(DTYPE_NAMES.values())}")
    return DTYPES_BY_NAME[name]
