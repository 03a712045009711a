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

import contextlib
import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from lowrank import freeze as _freeze
from lowrank import saving as _saving
from lowrank.nn import LinearNF4, LoRAEmbedding, LoRALinear
from lowrank.nn.lora import DECOMPOSING_INITS, INITS, LoRAOptionError, _check_rank_alpha_dropout

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


class TargetModulesError(LoRAOptionError):
    """``target_modules`` / ``modules_to_save`` / ``exclude_modules`` / ``layers_*`` name modules the model
    does not have (a :class:`LoRAOptionError`)."""


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
    bias: str = "none"
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    exclude_modules: str | list[str] | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: str | list[str] | None = None
    init: str = "kaiming"
    adapter_name: str = "default"
    loftq_iters: int = 1
    use_dora: bool = False

    def r_for(self, name: str) -> int:
        """The rank of module ``name`` (``rank_pattern`` over ``r``)."""
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        """The alpha of module ``name`` (``alpha_pattern`` over ``alpha``)."""
        return pattern_value(self.alpha_pattern, name, self.alpha)


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
        adapted_modules=sum(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules()),
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


def _peft_layer_index(name: str, layers_pattern) -> int | None:
    """The layer index PEFT reads from a module name: the first ``<pattern>.<digits>.`` (any pattern if None)."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return int(found.group("idx")) if found else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if found:
            return int(found.group("idx"))
    return None


def is_excluded(name: str, exclude_modules) -> bool:
    """PEFT's ``exclude_modules``: a regex string matched against the whole name, or a list of names/suffixes."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, name) is not None
    return name in exclude_modules or any(name.endswith("." + e) for e in exclude_modules)


def pattern_value(patterns: dict | None, name: str, default):
    r"""PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key ``k`` (in order) with
    ``re.match(rf"(.*\.)?({k})$", name)`` gives the value; no match gives ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_exclude(exclude_modules) -> None:
    if exclude_modules is None:
        return
    if isinstance(exclude_modules, str):
        try:
            re.compile(exclude_modules)
        except re.error as err:
            raise TargetModulesError(
                f"exclude_modules={exclude_modules!r} is not a valid regular expression: {err}"
            ) from err
        return
    if not isinstance(exclude_modules, (list, tuple, set)) or not all(isinstance(e, str) for e in exclude_modules):
        raise TargetModulesError(
            f"exclude_modules must be None, a regex string or a list of names, got {exclude_modules!r}"
        )


def resolve_targets(
    model: nn.Module,
    target_modules="all-linear",
    layers_to_transform: int | Iterable[int] | None = None,
    exclude: Iterable[str] = (),
    *,
    exclude_modules=None,
    layers_pattern: str | Sequence[str] | None = None,
    extra_names: Sequence[str] = (),
) -> list[str]:
    """Full names of the modules ``target_modules`` selects (see the module docstring).

    ``exclude`` are full names never adapted (modules_to_save); ``exclude_modules`` is PEFT's option
    (applied after matching, as PEFT does); ``layers_pattern`` names the layer ModuleList that
    ``layers_to_transform`` indexes (PEFT's option; only meaningful together with it); ``extra_names``
    are further adaptable (non-linear) module names, e.g. embeddings.
    """
    excluded = set(exclude)
    _check_exclude(exclude_modules)
    if layers_pattern is not None and layers_to_transform is None:
        raise TargetModulesError(f"layers_pattern={layers_pattern!r} needs layers_to_transform (as in PEFT)")
    if layers_pattern is not None and not (
        isinstance(layers_pattern, str)
        or (isinstance(layers_pattern, (list, tuple)) and all(isinstance(p, str) for p in layers_pattern))
    ):
        raise TargetModulesError(f"layers_pattern must be a string or a list of strings, got {layers_pattern!r}")
    heads = output_head_names(model)
    linear = [n for n in linear_module_names(model) if n not in excluded]
    names = [*linear, *(n for n in extra_names if n not in excluded)]
    if not linear and (target_modules == "all-linear" or not names):
        raise TargetModulesError(f"{type(model).__name__} has no linear layers (nn.Linear / Conv1D) to adapt")
    if target_modules == "all-linear":
        chosen = [n for n in names if n not in heads and n not in extra_names]
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
        if layers_pattern is None:
            chosen = [n for n in chosen if _freeze.layer_index(n) in wanted]
        else:
            chosen = [n for n in chosen if _peft_layer_index(n, layers_pattern) in wanted]
    chosen = [n for n in chosen if not is_excluded(n, exclude_modules)]
    if not chosen:
        raise TargetModulesError(
            f"target_modules={target_modules!r} (layers {layers_to_transform}, exclude_modules={exclude_modules!r}) "
            f"selects no module; linear layers: {_suffixes(names)}"
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


BIAS_CHOICES = ("none", "all", "lora_only")


def _sides(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer (nn.Linear, LinearNF4, GPT-2's Conv1D) or an embedding (ids, dim)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    return tuple(int(s) for s in module.weight.shape[:2])  # Conv1D stores (in, out)


def _check_pattern(pattern, what: str, integer: bool) -> dict:
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise LoRAOptionError(f"{what} must be a dict {{module pattern: value}}, got {pattern!r}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise LoRAOptionError(f"{what} keys must be non-empty strings (module-name patterns), got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise LoRAOptionError(f"{what} key {key!r} is not a valid regular expression: {err}") from err
        ok = not isinstance(value, bool) and (
            (isinstance(value, int) and value > 0) if integer else isinstance(value, (int, float))
        )
        if not ok:
            kind = "a positive integer" if integer else "a number"
            raise LoRAOptionError(f"{what}[{key!r}] must be {kind}, got {value!r}")
    return dict(pattern)


def mark_bias_trainable(model: nn.Module, bias: str) -> None:
    """PEFT's ``bias`` option: ``"all"`` -> every ``*.bias`` trains, ``"lora_only"`` -> the adapted layers' biases."""
    if bias == "all":
        for name, p in model.named_parameters():
            if (name == "bias" or name.endswith(".bias")) and p.is_floating_point():
                p.requires_grad_(True)
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, LoRALinear) and m.base_layer.bias is not None:
                m.base_layer.bias.requires_grad_(True)


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
    bias: str = "none",
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    adapter_name: str = "default",
    loftq_iters: int = 1,
    use_dora: bool = False,
) -> nn.Module:
    r"""Quantize, adapt and freeze ``model`` in place; return it.

    Args:
        r, alpha, dropout, use_rslora: LoRA hyper-parameters (see :class:`lowrank.nn.LoRALinear`).
        init: ``"kaiming"`` / ``"gaussian"`` (B = 0), or ``"pissa"`` / ``"olora"`` / ``"loftq"``, which decompose each
            target's full-precision weight BEFORE it is quantized (the 4-bit base holds the residual; see
            :func:`lowrank.nn.lora.low_rank_init`). ``"loftq"`` needs ``quantize`` and runs ``loftq_iters``
            rounds of quantize / rank-r fit.
        target_modules: ``"all-linear"`` (output head excluded), a list of module-name suffixes or a
            regex matched against the full module name.
        quantize: ``"nf4"`` / ``"fp4"`` (every linear layer except the head and ``modules_to_save``
            becomes a frozen 4-bit :class:`LinearNF4`) or None (bases stay dense and frozen).
        modules_to_save: module names (suffixes) trained in full and saved with the adapter; for
            sequence classification the default is the classifier head (as PEFT does).
        layers_to_transform: only adapt targets in these layer indices.
        bias: PEFT's ``bias``: ``"none"``, ``"all"`` (every bias of the model trains and is saved with the
            adapter) or ``"lora_only"`` (the biases of the adapted layers).
        rank_pattern, alpha_pattern: PEFT's per-module ``r`` / ``alpha``: ``{pattern: value}``, the first
            pattern ``p`` with ``re.match(rf"(.*\.)?({p})$", module_name)`` wins.
        exclude_modules: PEFT's option: a regex (full match) or a list of names/suffixes never adapted.
        layers_pattern: PEFT's option: the name(s) of the layer ModuleList ``layers_to_transform`` indexes.
        adapter_name: the name of this first adapter (PEFT's ``adapter_name``; ``"default"``).
        use_dora: DoRA (PEFT's ``use_dora``) on every target, dense or 4-bit (see :class:`lowrank.nn.LoRALinear`).

    After the call: ``model.lowrank_config`` (:class:`LoRASettings`), ``lowrank.summary(model)``.
    """
    if getattr(model, "lowrank_config", None) is not None:
        raise ValueError("model was already prepared by lowrank.prepare_model")
    _check_rank_alpha_dropout(r, alpha, dropout)
    if isinstance(loftq_iters, bool) or not isinstance(loftq_iters, int) or loftq_iters < 1:
        raise LoRAOptionError(f"loftq_iters must be a positive int, got {loftq_iters!r}")
    if quantize not in (None, "nf4", "fp4"):
        raise LoRAOptionError(f"quantize must be 'nf4', 'fp4' or None, got {quantize!r}")
    if init not in (*INITS, *DECOMPOSING_INITS):
        raise LoRAOptionError(f"init must be one of {sorted(set(INITS) | set(DECOMPOSING_INITS))}, got {init!r}")
    if use_dora and init in DECOMPOSING_INITS:
        raise LoRAOptionError(
            f"use_dora=True cannot be combined with init={init!r} (the decomposition rewrites the base weight the "
            "DoRA magnitude is measured against); use init='kaiming' or 'gaussian'"
        )
    if init == "loftq" and quantize is None:
        raise LoRAOptionError(
            "init='loftq' fits the adapter to the quantization error: it needs quantize='nf4' or 'fp4'"
        )
    if bias not in BIAS_CHOICES:
        raise LoRAOptionError(f"bias must be one of {BIAS_CHOICES}, got {bias!r}")
    rank_pattern = _check_pattern(rank_pattern, "rank_pattern", integer=True)
    alpha_pattern = _check_pattern(alpha_pattern, "alpha_pattern", integer=False)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise LoRAOptionError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
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
    embeddings = [n for n, m in model.named_modules() if type(m) is nn.Embedding and not in_saved(n)]
    targets = resolve_targets(
        model,
        target_modules,
        layers_to_transform,
        exclude=[n for n in all_linear if in_saved(n)],
        exclude_modules=exclude_modules,
        layers_pattern=layers_pattern,
        extra_names=embeddings,
    )
    target_set = set(targets)
    embedding_targets = [n for n in targets if n in embeddings]
    if embedding_targets and (use_dora or init not in INITS[:2]):
        raise ValueError(
            f"embedding targets {embedding_targets} take plain LoRA only: use_dora={use_dora!r}, init={init!r} "
            "are for linear layers (drop the embeddings from target_modules)"
        )
    for name in targets:  # checked before the model changes: a too-large rank is an error, not a huge allocation
        rank, sides = pattern_value(rank_pattern, name, r), _sides(model.get_submodule(name))
        if rank > max(sides):
            raise LoRAOptionError(
                f"r={rank} for {name} ({sides[0]} -> {sides[1]}): expected r <= {max(sides)}, the larger side "
                "of the layer (a rank above min(in, out) already adds no expressiveness)"
            )

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
        if name in target_set and init in DECOMPOSING_INITS:
            if isinstance(module, LinearNF4):
                raise ValueError(
                    f"init={init!r} decomposes the full-precision weight, but {name} is already 4-bit "
                    "(load the dense model, or use init='kaiming' on a base that already holds the residual)"
                )
            new = LoRALinear.from_dense(
                _as_linear(module),
                pattern_value(rank_pattern, name, r),
                pattern_value(alpha_pattern, name, alpha),
                dropout,
                use_rslora,
                init,
                quantize=None if name in heads else quantize,
                blocksize=blocksize,
                double_quant=double_quant,
                compute_dtype=compute_dtype,
                loftq_iters=loftq_iters,
                adapter_name=adapter_name,
            )
            new.to(device=module.weight.device)
        elif name in target_set:
            new = LoRALinear(
                base,
                pattern_value(rank_pattern, name, r),
                pattern_value(alpha_pattern, name, alpha),
                dropout,
                use_rslora,
                init,
                adapter_name=adapter_name,
                use_dora=use_dora,
            )
            new.to(device=base.weight.device)
        else:
            new = base
        if new is not module:
            new._lowrank_from_conv1d = from_conv1d or getattr(module, "_lowrank_from_conv1d", False)
            _set_module(model, name, new)  # the dense layer is released here, one layer at a time
    for name in embedding_targets:
        module = model.get_submodule(name)
        r_e, alpha_e = pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, alpha)
        _set_module(model, name, LoRAEmbedding(module, r_e, alpha_e, use_rslora, init, adapter_name=adapter_name))
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    mark_bias_trainable(model, bias)

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
        bias=bias,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        exclude_modules=_as_name_list(exclude_modules),
        layers_to_transform=_as_layer_list(layers_to_transform),
        layers_pattern=layers_pattern,
        init=init,
        adapter_name=adapter_name,
        loftq_iters=loftq_iters,
        use_dora=bool(use_dora),
    )
    model.lowrank_adapters = {adapter_name: model.lowrank_config}
    model.lowrank_active_adapters = [adapter_name]
    model.lowrank_bytes_before = bytes_before
    model.lowrank_summary = summary(model)
    _saving.guard_save_pretrained(model)  # save_pretrained would write a checkpoint transformers misloads
    if verbose:
        print(model.lowrank_summary)
    return model


# -- named adapters (PEFT's add_adapter / set_adapter / delete_adapter / disable_adapter) --------------


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    """Every LoRA layer (linear and embedding) of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))}


def adapter_configs(model: nn.Module) -> dict[str, LoRASettings]:
    """The settings of every named adapter of a prepared model (``{name: LoRASettings}``, in creation order)."""
    configs = getattr(model, "lowrank_adapters", None)
    if configs is None:
        config = getattr(model, "lowrank_config", None)
        if config is None:
            raise ValueError("the model carries no LoRA adapters; call lowrank.prepare_model (or load_adapter) first")
        configs = model.lowrank_adapters = {config.adapter_name: config}
    return configs


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters the forward currently applies (``set_adapter`` chooses them)."""
    configs = adapter_configs(model)
    return list(getattr(model, "lowrank_active_adapters", None) or list(configs)[:1])


def _check_adapter_name(model: nn.Module, name) -> LoRASettings:
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"adapter {name!r} does not exist; the model has adapters {list(configs)}")
    return configs[name]


def add_adapter(
    model: nn.Module,
    name: str,
    *,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules="all-linear",
    use_rslora: bool = False,
    layers_to_transform: int | Iterable[int] | None = None,
    init: str = "kaiming",
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> nn.Module:
    """Add a further named adapter to a prepared model (PEFT's ``add_adapter``); return the model.

    The new adapter starts inactive and frozen (``set_adapter(model, name)`` activates it and makes
    only it train); its options mean what they mean in :func:`prepare_model`. Targets that are not
    adapted yet are wrapped in a :class:`LoRALinear` (their base stays as prepared: 4-bit or dense).
    ``bias`` and ``modules_to_save`` belong to the model's first adapter and cannot be set here.
    """
    configs = adapter_configs(model)
    first = next(iter(configs.values()))
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists; the model has adapters {list(configs)}")
    if init not in ("kaiming", "gaussian"):
        raise ValueError(
            f"a further adapter's init must be 'kaiming' or 'gaussian', got {init!r} (PiSSA/OLoRA/LoftQ rewrite the "
            "base weight, which the other adapters share)"
        )
    rank_pattern = _check_pattern(rank_pattern, "rank_pattern", integer=True)
    alpha_pattern = _check_pattern(alpha_pattern, "alpha_pattern", integer=False)
    saved = tuple(first.modules_to_save)
    all_linear = linear_module_names(model)
    targets = resolve_targets(
        model,
        target_modules,
        layers_to_transform,
        exclude=[n for n in all_linear if any(n == s or n.startswith(s + ".") for s in saved)],
        exclude_modules=exclude_modules,
        layers_pattern=layers_pattern,
    )
    for target in targets:
        module = model.get_submodule(target)
        if isinstance(module, LoRAEmbedding):
            raise ValueError(f"{target} is a LoRA embedding, which holds one adapter; leave it out of target_modules")
        r_t, alpha_t = pattern_value(rank_pattern, target, r), pattern_value(alpha_pattern, target, alpha)
        if isinstance(module, LoRALinear):
            adapter = module.add_adapter(name, r_t, alpha_t, dropout, use_rslora, init)
            adapter.requires_grad_(False)
            continue
        from_conv1d = bool(Conv1D) and isinstance(module, Conv1D)
        base = _as_linear(module) if from_conv1d else module
        new = LoRALinear(base, r_t, alpha_t, dropout, use_rslora, init, adapter_name=name)
        new.to(device=base.weight.device)
        new.active_adapters = [a for a in active_adapters(model) if a in new.adapter_names]
        new.lora_A.requires_grad_(False)
        new.lora_B.requires_grad_(False)
        new._lowrank_from_conv1d = from_conv1d or getattr(module, "_lowrank_from_conv1d", False)
        _set_module(model, target, new)
    configs[name] = dataclasses.replace(
        first,
        r=r,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        target_modules=targets,
        modules_to_save=[],
        modules_to_save_spec=[],
        bias="none",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        exclude_modules=_as_name_list(exclude_modules),
        layers_to_transform=_as_layer_list(layers_to_transform),
        layers_pattern=layers_pattern,
        init=init,
        adapter_name=name,
    )
    return model


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` (one name or a list) the active adapters (PEFT's ``set_adapter``): the forward adds
    exactly these, and only their parameters train (the others are frozen)."""
    wanted = [names] if isinstance(names, str) else list(names)
    if not wanted:
        raise ValueError("set_adapter needs at least one adapter name (use disable_adapters to run the base)")
    for name in wanted:
        _check_adapter_name(model, name)
    for module in adapter_layers(model).values():
        module.set_active_adapters([n for n in wanted if n in module.adapter_names])
    model.lowrank_active_adapters = wanted
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` (PEFT's ``delete_adapter``); layers left without any adapter get their base back."""
    _check_adapter_name(model, name)
    configs = adapter_configs(model)
    if len(configs) == 1:
        raise ValueError(f"adapter {name!r} is the model's only adapter; merge_adapters or reload the base instead")
    for module_name, module in adapter_layers(model).items():
        if name not in module.adapter_names:
            continue
        if getattr(module, "merged", False):
            raise RuntimeError(f"{module_name} is merged; unmerge it before deleting adapter {name!r}")
        if module.adapter_names == [name]:
            base = module.base_layer
            base._lowrank_from_conv1d = getattr(module, "_lowrank_from_conv1d", False)
            _set_module(model, module_name, base)
        else:
            module.remove_adapter(name)
    del configs[name]
    remaining = [a for a in active_adapters(model) if a != name] or [next(iter(configs))]
    if model.lowrank_config.adapter_name == name:
        model.lowrank_config = next(iter(configs.values()))
    set_adapter(model, remaining)
    return model


class disable_adapters:  # noqa: N801 (a context manager used like a function, as PEFT's disable_adapter())
    """``with lowrank.disable_adapters(model):`` runs the base model alone (every LoRA layer's forward is
    its base layer's, exactly); the adapters come back on exit."""

    def __init__(self, model: nn.Module):
        adapter_configs(model)
        self.model = model
        self._saved: list[tuple[LoRALinear, bool]] = []

    def __enter__(self) -> nn.Module:
        self._saved = [(m, m.adapters_enabled) for m in adapter_layers(self.model).values()]
        for module, _ in self._saved:
            module.adapters_enabled = False
        return self.model

    def __exit__(self, *exc) -> None:
        for module, enabled in self._saved:
            module.adapters_enabled = enabled
        self._saved = []


#: the name that means "no adapter" for an example of a mixed batch (PEFT's ``"__base__"``)
BASE_ADAPTER = "__base__"


class mixed_batch:  # noqa: N801 (a context manager used like a function)
    """``with lowrank.mixed_batch(model, ["a", "b", "__base__", ...]):`` runs each example of the batch (the
    first dimension of the input) through its own adapter -- PEFT's ``adapter_names=`` inference argument.
    Every LoRA linear layer then runs the base once for the whole batch and the low-rank terms as one gathered
    batched matmul (:func:`lowrank.ops.lora_multi.lora_linear_multi_adapter`); ``"__base__"`` (or an adapter a
    layer does not carry) runs the base alone. Plain LoRA adapters only (not DoRA)."""

    def __init__(self, model: nn.Module, adapter_names: Sequence[str]):
        configs = adapter_configs(model)
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"adapter_names must be a list of adapter names, one per example, got {adapter_names!r}")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in configs})
        if unknown:
            raise ValueError(
                f"adapter_names {unknown} do not exist; the model has adapters {list(configs)} (and {BASE_ADAPTER!r})"
            )
        self.model, self.names = model, list(adapter_names)

    def __enter__(self) -> nn.Module:
        for module in adapter_layers(self.model).values():
            module.batch_adapter_names = self.names
        return self.model

    def __exit__(self, *exc) -> None:
        for module in adapter_layers(self.model).values():
            module.batch_adapter_names = None


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device (buffers stay real): the skeleton costs no memory."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(module._parameters[name])
            module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _as_name_list(names):
    """``exclude_modules`` as stored in the settings: a list for a collection, a regex string unchanged."""
    return list(names) if isinstance(names, (list, tuple, set)) else names


def _as_layer_list(layers):
    """``layers_to_transform`` as stored in the settings: None, or a sorted list of layer indices."""
    if layers is None:
        return None
    return [layers] if isinstance(layers, int) else sorted(layers)
