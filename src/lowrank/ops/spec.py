"""``OpSpec``: a custom op's arguments written once.

An op is declared as one list of ``(name, schema type)`` pairs. From it follow the ``torch.library`` schema,
the binding of the positional inputs to names (a namedtuple handed to the implementation, the fake, the
autograd ``setup_context`` and the backward), calls by name, saving tensors for the backward by name, and
the backward's gradient tuple: the backward names the gradients it has; every other input gets ``None``
(a ``Tensor[]`` input a list of ``None``) in the structure torch.library checks. A backward op is derived from its
forward op (arguments added or dropped), never re-typed.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import torch


class OpSpec:
    """The arguments of the custom op ``qualname`` (``"namespace::name"``) and what follows from them."""

    def __init__(self, qualname: str, args: Sequence[tuple[str, str] | tuple[str, str, str]], returns: str):
        # (name, schema type) or (name, schema type, Python default); defaults only at the end
        self.qualname = qualname
        self.args = tuple((arg[0], arg[1]) for arg in args)
        self.defaults = {arg[0]: arg[2] for arg in args if len(arg) == 3}
        self.names = tuple(name for name, _ in self.args)
        if list(self.defaults) != list(self.names[len(self.names) - len(self.defaults) :]):
            raise ValueError(f"{qualname}: arguments with defaults must come last, got {list(self.defaults)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{qualname}: argument names repeat: {self.names}")
        self.returns = returns
        # the dispatcher hands a Python implementation only the arguments given: defaults fill the rest
        self.Args = collections.namedtuple("Args", self.names, defaults=tuple(self.defaults.values()))
        self.op = None

    @property
    def schema(self) -> str:
        parts = [
            f"{kind} {name}" + (f"={_schema_default(self.defaults[name])}" if name in self.defaults else "")
            for name, kind in self.args
        ]
        return "(" + ", ".join(parts) + f") -> {self.returns}"

    def derive(
        self,
        qualname: str,
        *,
        before: Sequence[tuple[str, str]] = (),
        after: Sequence[tuple[str, str]] = (),
        drop: Sequence[str] = (),
        returns: str | None = None,
    ) -> OpSpec:
        """Another op whose arguments are this one's, minus ``drop``, with ``before`` / ``after`` around them."""
        unknown = set(drop) - set(self.names)
        if unknown:
            raise KeyError(f"{self.qualname} has no arguments {sorted(unknown)}")
        kept = [
            (*arg, self.defaults[arg[0]]) if arg[0] in self.defaults else arg for arg in self.args if arg[0] not in drop
        ]
        return OpSpec(qualname, [*before, *kept, *after], returns or self.returns)

    def define(self, impl: Callable, fake: Callable):
        """Register the op with ``impl(args)`` and ``fake(args)`` taking the bound arguments; returns it."""
        self.op = torch.library.custom_op(
            self.qualname, lambda *values: impl(self.Args(*values)), mutates_args=(), schema=self.schema
        )
        self.op.register_fake(lambda *values: fake(self.Args(*values)))
        return self.op

    def positional(self, named: dict) -> tuple:
        """The op's positional inputs from a mapping that names every argument exactly once."""
        missing = [name for name in self.names if name not in named]
        extra = sorted(set(named) - set(self.names))
        if missing or extra:
            raise TypeError(f"{self.qualname}: missing arguments {missing}, unknown arguments {extra}")
        return tuple(named[name] for name in self.names)

    def __call__(self, **named):
        return self.op(*self.positional(named))

    def register_autograd(self, setup: Callable, backward: Callable) -> None:
        """``setup(ctx, args, output)``; ``backward(ctx, *grads) -> {input name: gradient}``."""
        names = self.names
        tensor_lists = {name for name, kind in self.args if kind.startswith("Tensor") and kind.endswith("[]")}

        def setup_context(ctx, inputs, output):
            # a list of tensors gets a list of gradients; every other input one gradient (or None)
            ctx.list_lengths = {name: len(v) for name, v in zip(names, inputs, strict=True) if name in tensor_lists}
            setup(ctx, self.Args(*inputs), output)

        def full_backward(ctx, *grads):
            given = backward(ctx, *grads)
            unknown = set(given) - set(names)
            if unknown:
                raise KeyError(f"{self.qualname}: gradients for unknown inputs {sorted(unknown)}")
            return tuple(
                given[name] if name in given else [None] * ctx.list_lengths[name] if name in ctx.list_lengths else None
                for name in names
            )

        self.op.register_autograd(full_backward, setup_context=setup_context)


_SCALAR_TYPE_CODES = {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}


def _schema_default(value) -> str:
    if isinstance(value, torch.dtype):
        return str(_SCALAR_TYPE_CODES[value])
    if value is None:
        return "None"
    return repr(value)


def save(ctx, **named) -> None:
    """``ctx.save_for_backward`` by name: tensors, None and lists of tensors; :func:`saved` returns them."""
    flat, layout = [], []
    for name, value in named.items():
        if isinstance(value, (list, tuple)):
            layout.append((name, len(value)))
            flat.extend(value)
        else:
            layout.append((name, None))
            flat.append(value)
    ctx.save_for_backward(*flat)
    ctx.saved_layout = layout


def saved(ctx) -> dict:
    tensors, out, i = ctx.saved_tensors, {}, 0
    for name, length in ctx.saved_layout:
        if length is None:
            out[name], i = tensors[i], i + 1
        else:
            out[name], i = list(tensors[i : i + length]), i + length
    return out
