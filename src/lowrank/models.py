"""Model surgery on Hugging Face models: quantize the frozen base to NF4, wrap targets in LoRA, freeze.

:func:`prepare_model` works in place, module by module: each dense linear layer is quantized and
replaced before the next one is touched, so the extra memory at any moment is about one layer.
GPT-2's ``Conv1D`` (weight stored ``(in, out)``) is converted to Linear semantics ``(out, in)``; the
converted modules remember it so merging gives ``Conv1D`` back.

Target selection follows PEFT (``LoraConfig.target_modules``): ``"all-linear"`` = every linear layer
except the output head; a list = module names equal to an entry or ending in ``"." + entry``; any
other string = a regex that must match the whole module name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lowrank import freeze as _freeze
from lowrank import saving as _saving
from lowrank.nn import LinearNF4, LoRALinear

try:  # transformers is a runtime dependency, Conv1D only matters for GPT-2-style models
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

HEAD_NAMES = _freeze.HEAD_NAMES
# transformers class-name suffix -> PEFT task_type (decides the PeftModel wrapper class on load)
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)


class TargetModulesError(ValueError):
    """``target_modules`` / ``modules_to_save`` name modules the model does not have."""


@dataclasses.dataclass
class LoRASettings:
    """What :func:`prepare_model` did, kept on the model as ``model.lowrank_config``."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    quantize: str | None
    blocksize: int
    double_quant: bool
    target_modules: list[str]  # full module names that carry an adapter
    modules_to_save: list[str]  # full module names trained in full and saved with the adapter
    modules_to_save_spec: list[str]  # as the user gave them (PEFT writes these names)
    task_type: str | None


@dataclasses.dataclass
class Summary:
    """Parameter and memory accounting of a prepared model (``lowrank.summary(model)``)."""

    trainable_params: int
    total_params: int  # quantized weights count their original number of elements
    bytes_before: int | None  # parameters + buffers before prepare_model (None if unknown)
    bytes_after: int  # parameters + buffers now
    adapted_modules: int
    quantized_modules: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        before = "?" if self.bytes_before is None else f"{self.bytes_before / 2**20:.2f} MiB"
        return (
            f"trainable params: {self.trainable_params:,} / {self.total_params:,} "
            f"({100 * self.trainable_fraction:.3f}%) | "
            f"memory {before} -> {self.bytes_after / 2**20:.2f} MiB | "
            f"{self.adapted_modules} LoRA modules, {self.quantized_modules} NF4 linear layers"
        )


def _bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def summary(model: nn.Module) -> Summary:
    """Count trainable / total parameters and bytes of ``model`` (prepared or not)."""
    trainable = total = 0
    quantized = [m for m in model.modules() if isinstance(m, LinearNF4)]
    # the 4-bit bytes are frozen parameters too; a quantized weight counts its original elements instead
    seen: set[int] = {id(getattr(m, name)) for m in quantized for name in LinearNF4.QUANTIZED_PARAMETERS}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in quantized)
    return Summary(
        trainable_params=trainable,
        total_params=total,
        bytes_before=getattr(model, "lowrank_bytes_before", None),
        bytes_after=_bytes(model),
        adapted_modules=sum(isinstance(m, LoRALinear) for m in model.modules()),
        quantized_modules=len(quantized),
    )


# -- finding modules --------------------------------------------------------------------------------


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LinearNF4)) or (bool(Conv1D) and isinstance(module, Conv1D))


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output layer(s): the output embeddings and any lm_head/classifier/score."""
    names = {name for name, _ in model.named_children() if name in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        names |= {name for name, m in model.named_modules() if m is out}
    heads = set()
    for name, m in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in names) and _is_linear(m):
            heads.add(name)
    return heads


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every linear layer (nn.Linear, Conv1D, LinearNF4, or the base of a LoRALinear)."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            names.append(name)
        elif _is_linear(m) and not name.endswith(".base_layer"):
            names.append(name)
    return names


def _suffixes(names: Iterable[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def _match_names(names: Sequence[str], spec, what: str) -> list[str]:
    """PEFT matching of ``spec`` (list of suffixes or full-match regex) against ``names``."""
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise TargetModulesError(f"{what}={spec!r} is not a valid regular expression: {err}") from err
        chosen = [n for n in names if pattern.fullmatch(n)]
        if not chosen:
            raise TargetModulesError(
                f"{what} regex {spec!r} matches no linear module; they are named like {_suffixes(names)}"
            )
        return chosen
    if not isinstance(spec, (list, tuple, set)) or not all(isinstance(s, str) and s for s in spec):
        raise TargetModulesError(f"{what} must be 'all-linear', a regex string or a list of module names, got {spec!r}")
    unknown = [s for s in spec if not any(n == s or n.endswith("." + s) for n in names)]
    if unknown:
        raise TargetModulesError(
            f"{what} {unknown} match none of the {len(names)} linear layers; available names: {_suffixes(names)}"
        )
    return [n for n in names if any(n == s or n.endswith("." + s) for s in spec)]


def resolve_targets(
    model: nn.Module,
    target_modules="all-linear",
    layers_to_transform: int | Iterable[int] | None = None,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Full names of the modules ``target_modules`` selects (see the module docstring)."""
    excluded = set(exclude)
    heads = output_head_names(model)
    names = [n for n in linear_module_names(model) if n not in excluded]
    if not names:
        raise TargetModulesError(f"{type(model).__name__} has no linear layers (nn.Linear / Conv1D) to adapt")
    if target_modules == "all-linear":
        chosen = [n for n in names if n not in heads]
    elif target_modules is None:
        raise TargetModulesError(
            "target_modules must be 'all-linear', a regex string or a list of module names, got None"
        )
    else:
        chosen = _match_names(names, target_modules, "target_modules")
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        total = _freeze.num_layers(model)
        bad = [i for i in wanted if not 0 <= i < total]
        if bad:
            raise TargetModulesError(f"layers_to_transform {sorted(bad)} out of range: the model has {total} layers")
        chosen = [n for n in chosen if _freeze.layer_index(n) in wanted]
    if not chosen:
        raise TargetModulesError(
            f"target_modules={target_modules!r} (layers {layers_to_transform}) selects no module; "
            f"linear layers: {_suffixes(names)}"
        )
    return chosen


def task_type_of(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if cls.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") else None


# -- surgery ----------------------------------------------------------------------------------------


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear with Linear semantics for a Conv1D (weight transposed), or the module itself."""
    if isinstance(module, nn.Linear):
        return module
    w = module.weight.detach()
    linear = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def prepare_model(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules="all-linear",
    quantize: str | None = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    layers_to_transform: int | Iterable[int] | None = None,
    init: str = "kaiming",
    compute_dtype: torch.dtype | None = None,
    verbose: bool = False,
) -> nn.Module:
    """Quantize, adapt and freeze ``model`` in place; return it.

    Args:
        r, alpha, dropout, use_rslora, init: LoRA hyper-parameters (see :class:`lowrank.nn.LoRALinear`).
        target_modules: ``"all-linear"`` (output head excluded), a list of module-name suffixes or a
            regex matched against the full module name.
        quantize: ``"nf4"`` / ``"fp4"`` (every linear layer except the head and ``modules_to_save``
            becomes a frozen 4-bit :class:`LinearNF4`) or None (bases stay dense and frozen).
        modules_to_save: module names (suffixes) trained in full and saved with the adapter; for
            sequence classification the default is the classifier head (as PEFT does).
        layers_to_transform: only adapt targets in these layer indices.

    After the call: ``model.lowrank_config`` (:class:`LoRASettings`), ``lowrank.summary(model)``.
    """
    if getattr(model, "lowrank_config", None) is not None:
        raise ValueError("model was already prepared by lowrank.prepare_model")
    if quantize not in (None, "nf4", "fp4"):
        raise ValueError(f"quantize must be 'nf4', 'fp4' or None, got {quantize!r}")
    bytes_before = _bytes(model)
    task_type = task_type_of(model)
    all_linear = linear_module_names(model)
    heads = output_head_names(model)
    if modules_to_save is None and task_type == "SEQ_CLS":
        modules_to_save = [n for n in ("classifier", "score") if n in dict(model.named_children())]
    save_spec = list(modules_to_save or [])
    module_names = [n for n, _ in model.named_modules() if n]
    saved = []
    for spec in save_spec:
        hits = [n for n in module_names if n == spec or n.endswith("." + spec)]
        if not hits:
            raise TargetModulesError(
                f"modules_to_save entry {spec!r} matches no module; "
                f"top-level modules: {[n for n, _ in model.named_children()]}"
            )
        saved += hits
    saved_prefixes = tuple(saved)
    in_saved = lambda n: any(n == s or n.startswith(s + ".") for s in saved_prefixes)  # noqa: E731
    targets = resolve_targets(
        model, target_modules, layers_to_transform, exclude=[n for n in all_linear if in_saved(n)]
    )
    target_set = set(targets)

    for p in model.parameters():
        p.requires_grad_(False)
    for name in all_linear:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already carries a LoRA adapter")
        if in_saved(name) or (name in heads and name not in target_set):
            continue
        from_conv1d = bool(Conv1D) and isinstance(module, Conv1D)
        base = module
        if quantize is not None and name not in heads and not isinstance(module, LinearNF4):
            base = LinearNF4.from_linear(_as_linear(module), blocksize, double_quant, quantize, compute_dtype)
        elif from_conv1d and name in target_set:
            base = _as_linear(module)
        if name in target_set:
            new = LoRALinear(base, r, alpha, dropout, use_rslora, init)
            new.to(device=base.weight.device)
        else:
            new = base
        if new is not module:
            new._lowrank_from_conv1d = from_conv1d or getattr(module, "_lowrank_from_conv1d", False)
            _set_module(model, name, new)  # the dense layer is released here, one layer at a time
    for name in saved:
        model.get_submodule(name).requires_grad_(True)

    model.lowrank_config = LoRASettings(
        r=r,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        quantize=quantize,
        blocksize=blocksize,
        double_quant=double_quant,
        target_modules=targets,
        modules_to_save=saved,
        modules_to_save_spec=save_spec,
        task_type=task_type,
    )
    model.lowrank_bytes_before = bytes_before
    model.lowrank_summary = summary(model)
    _saving.guard_save_pretrained(model)  # save_pretrained would write a checkpoint transformers misloads
    if verbose:
        print(model.lowrank_summary)
    return model
