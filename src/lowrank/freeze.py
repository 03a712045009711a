"""Freezing policies: which parameters train, gradual unfreezing, and per-layer learning rates.

Every policy works on parameter names (``model.named_parameters()``) and sets ``requires_grad``.
Frozen means: ``requires_grad=False`` and ``.grad`` cleared, so autograd keeps no activations for
that weight's gradient and optimizers (torch AdamW, :class:`lowrank.optim.PagedAdamW`) create no
state for it (they skip parameters whose ``.grad`` is None). Non-floating tensors (packed NF4 bytes)
can never train and are ignored.

Selectors, shared by all functions:

* ``match``: None (everything), a regex string (``re.search`` on the parameter name), a list of
  names (each matches a whole dotted component run: ``"self_attn"`` matches
  ``model.layers.0.self_attn.q_proj.lora_A``), or a callable ``(name, param) -> bool``.
* ``layers``: None, or layer indices of the transformer stack (negative counts from the top, so
  ``range(-2, 0)`` is the top two layers). A parameter outside the stack never matches a layer filter.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

# ModuleList names of transformer stacks in transformers models (Llama/Mistral/Qwen2: layers, GPT-2: h,
# BERT: layer).
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")

Match = str | Sequence[str] | Callable[[str, torch.Tensor], bool] | None


class FreezeError(ValueError):
    """A freezing selector matched nothing or was malformed."""


def layer_index(name: str) -> int | None:
    """The transformer-layer index in a parameter or module name, or None outside the stack."""
    found = _LAYER_RE.search(name)
    return int(found.group(1)) if found else None


def num_layers(model: nn.Module) -> int:
    """How many layers the model's transformer stack has (0 if it has none)."""
    indices = [layer_index(name) for name, _ in model.named_parameters()]
    indices = [i for i in indices if i is not None]
    return max(indices) + 1 if indices else 0


def _trainable_candidates(model: nn.Module):
    for name, p in model.named_parameters():
        if p.is_floating_point() or p.is_complex():
            yield name, p


def _matcher(
    model: nn.Module, match: Match, layers: Iterable[int] | slice | None
) -> Callable[[str, torch.Tensor], bool]:
    if match is None:
        name_ok = lambda name, p: True  # noqa: E731
    elif isinstance(match, str):
        try:
            pattern = re.compile(match)
        except re.error as err:
            raise FreezeError(f"match {match!r} is not a valid regular expression: {err}") from err
        name_ok = lambda name, p: pattern.search(name) is not None  # noqa: E731
    elif callable(match):
        name_ok = match
    elif isinstance(match, Sequence) and all(isinstance(m, str) for m in match):
        wanted = [f".{m.strip('.')}." for m in match]
        name_ok = lambda name, p: any(w in f".{name}." for w in wanted)  # noqa: E731
    else:
        raise FreezeError(f"match must be None, a regex string, a list of names or a callable, got {match!r}")
    if layers is None:
        return name_ok
    total = num_layers(model)
    if total == 0:
        raise FreezeError("a layers= filter was given but the model has no layer stack (layers/h/layer ModuleList)")
    indices = range(total)[layers] if isinstance(layers, slice) else list(layers)
    chosen = set()
    for i in indices:
        if not -total <= i < total:
            raise FreezeError(f"layer index {i} is out of range for a model with {total} layers")
        chosen.add(i % total)
    return lambda name, p: layer_index(name) in chosen and name_ok(name, p)


def select(model: nn.Module, match: Match = None, layers: Iterable[int] | slice | None = None) -> list[str]:
    """Names of the floating-point parameters that ``match`` and ``layers`` select."""
    ok = _matcher(model, match, layers)
    return [name for name, p in _trainable_candidates(model) if ok(name, p)]


def _set(p: torch.Tensor, trainable: bool) -> None:
    p.requires_grad_(trainable)
    if not trainable:
        p.grad = None


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def train_only(model: nn.Module, match: Match = None, layers: Iterable[int] | slice | None = None) -> list[str]:
    """Make exactly the selected parameters trainable, freeze all others; return the trainable names.

    Raises FreezeError when the selection is empty (a typo would otherwise freeze the whole model).
    """
    chosen = set(select(model, match, layers))
    if not chosen:
        raise FreezeError(f"match={match!r} layers={layers!r} selects no parameter; names look like {_examples(model)}")
    for name, p in _trainable_candidates(model):
        _set(p, name in chosen)
    return trainable_names(model)


def train_all_except(model: nn.Module, match: Match = None, layers: Iterable[int] | slice | None = None) -> list[str]:
    """Make every floating-point parameter trainable except the selected ones; return the trainable names."""
    excluded = set(select(model, match, layers))
    if not excluded:
        raise FreezeError(f"match={match!r} layers={layers!r} selects no parameter; names look like {_examples(model)}")
    for name, p in _trainable_candidates(model):
        _set(p, name not in excluded)
    return trainable_names(model)


def freeze(model: nn.Module, match: Match = None, layers: Iterable[int] | slice | None = None) -> list[str]:
    """Freeze the selected parameters, leave the others as they are; return the frozen names."""
    names = select(model, match, layers)
    params = dict(model.named_parameters())
    for name in names:
        _set(params[name], False)
    return names


def unfreeze(model: nn.Module, match: Match = None, layers: Iterable[int] | slice | None = None) -> list[str]:
    """Make the selected parameters trainable, leave the others as they are; return their names."""
    names = select(model, match, layers)
    params = dict(model.named_parameters())
    for name in names:
        _set(params[name], True)
    return names


def _examples(model: nn.Module, n: int = 4) -> list[str]:
    names = [name for name, _ in _trainable_candidates(model)]
    return names[:n] + (["..."] if len(names) > n else [])


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of LoRA parameters: those a module reports through ``adapter_params()``."""
    names = []
    for module_name, module in model.named_modules():
        adapter_params = getattr(module, "adapter_params", None)
        if callable(adapter_params):
            found = adapter_params()
            ids = {id(p) for p in (found.values() if isinstance(found, dict) else found)}
            prefix = f"{module_name}." if module_name else ""
            names += [prefix + n for n, p in module.named_parameters() if id(p) in ids]
    return names


def adapters_only(model: nn.Module, also: Match = None) -> list[str]:
    """Train the LoRA adapters (plus ``modules_to_save`` recorded by prepare_model and ``also``)."""
    chosen = set(adapter_parameter_names(model))
    config = getattr(model, "lowrank_config", None)
    saved = list(config.modules_to_save) if config is not None else []
    if saved:
        chosen |= set(select(model, list(saved)))
    bias = getattr(config, "bias", "none")
    if bias == "all":
        chosen |= {n for n, _ in _trainable_candidates(model) if n == "bias" or n.endswith(".bias")}
    elif bias == "lora_only":
        for module_name, module in model.named_modules():
            base = getattr(module, "base_layer", None)
            if callable(getattr(module, "adapter_params", None)) and getattr(base, "bias", None) is not None:
                chosen.add(f"{module_name}.base_layer.bias" if module_name else "base_layer.bias")
    if also is not None:
        chosen |= set(select(model, also))
    if not chosen:
        raise FreezeError("the model has no LoRA adapters; call lowrank.prepare_model first")
    for name, p in _trainable_candidates(model):
        _set(p, name in chosen)
    return trainable_names(model)


def head_names(model: nn.Module) -> list[str]:
    """Parameter names of the output head (lm_head / classifier / score / qa_outputs / cls)."""
    return select(model, lambda name, p: name.split(".")[0] in HEAD_NAMES)


def head_only(model: nn.Module) -> list[str]:
    """Feature extraction: train only the output head. (A head tied to the input embeddings, as in
    GPT-2, unfreezes the embeddings too: they are the same tensor.)"""
    chosen = set(head_names(model))
    if not chosen:
        raise FreezeError(
            f"no output head ({', '.join(HEAD_NAMES)}) found; "
            f"top-level modules: {[n for n, _ in model.named_children()]}"
        )
    for name, p in _trainable_candidates(model):
        _set(p, name in chosen)
    return trainable_names(model)


def full(model: nn.Module) -> list[str]:
    """Train every floating-point parameter (quantized NF4 bases stay frozen: they are not floats)."""
    for _, p in _trainable_candidates(model):
        _set(p, True)
    return trainable_names(model)


def drop_frozen_state(optimizer: torch.optim.Optimizer) -> int:
    """Free optimizer state of parameters that are now frozen; return how many states were dropped."""
    dropped = [p for p in list(optimizer.state) if not p.requires_grad]
    for p in dropped:
        del optimizer.state[p]
    return len(dropped)


@dataclasses.dataclass(frozen=True)
class Stage:
    """From optimizer step ``start`` on, additionally train what ``match``/``layers`` select."""

    start: int
    match: Match = None
    layers: tuple[int, ...] | None = None


class GradualUnfreezing:
    """A cumulative unfreezing schedule: at step ``s`` the union of all stages with ``start <= s`` trains.

    Call ``schedule.apply(model, step)`` before each optimizer step (it only touches parameters when
    the stage changes and returns True then). Build the optimizer over every parameter that will
    ever train: frozen ones get no gradient and therefore no optimizer state until they thaw.
    """

    def __init__(self, stages: Sequence[Stage]):
        if not stages:
            raise FreezeError("GradualUnfreezing needs at least one stage")
        starts = [s.start for s in stages]
        if starts != sorted(starts) or starts[0] != 0 or len(set(starts)) != len(starts):
            raise FreezeError(f"stage starts must be strictly increasing and begin at 0, got {starts}")
        self.stages = list(stages)
        self._applied: int | None = None

    @classmethod
    def top_down(cls, model: nn.Module, every: int, layers_per_stage: int = 1, base: Match = None) -> GradualUnfreezing:
        """ULMFiT order: the head (and ``base``, e.g. the adapters) first, then one more group of
        ``layers_per_stage`` layers from the top every ``every`` steps, and at the end everything."""
        if every <= 0 or layers_per_stage <= 0:
            raise FreezeError(f"every and layers_per_stage must be positive, got {every}, {layers_per_stage}")
        head = set(head_names(model)) | (set(select(model, base)) if base is not None else set())
        stages = [Stage(0, match=lambda name, p, head=frozenset(head): name in head)]
        total = num_layers(model)
        top = total
        while top > 0:
            low = max(0, top - layers_per_stage)
            stages.append(Stage(len(stages) * every, layers=tuple(range(low, top))))
            top = low
        stages.append(Stage(len(stages) * every))
        return cls(stages)

    def stage_at(self, step: int) -> int:
        return max(i for i, s in enumerate(self.stages) if s.start <= step)

    def apply(self, model: nn.Module, step: int) -> bool:
        """Set ``requires_grad`` for ``step``; return True if the trainable set changed."""
        current = self.stage_at(step)
        if current == self._applied:
            return False
        chosen: set[str] = set()
        for stage in self.stages[: current + 1]:
            chosen |= set(select(model, stage.match, stage.layers))
        for name, p in _trainable_candidates(model):
            _set(p, name in chosen)
        self._applied = current
        return True


def discriminative_lr_groups(
    model: nn.Module,
    lr: float,
    decay: float = 0.9,
    weight_decay: float = 0.0,
    include_frozen: bool = False,
) -> list[dict]:
    """Optimizer parameter groups with layer-wise learning-rate decay (ELECTRA/BEiT style).

    Depth 0 is everything below the layer stack (embeddings), layer ``i`` has depth ``i + 1`` and
    everything above it (final norm, head) depth ``L + 1``; a group's lr is
    ``lr * decay ** (L + 1 - depth)``. Biases and other 1-D tensors get no weight decay.
    ``include_frozen`` also lists frozen parameters (for gradual unfreezing). Empty groups are omitted.
    Each group carries ``depth`` and ``lr_scale`` keys (ignored by torch optimizers).
    """
    if not 0.0 < decay <= 1.0:
        raise FreezeError(f"decay must be in (0, 1], got {decay}")
    total = num_layers(model)
    seen_layer = False
    groups: dict[tuple[int, bool], list[torch.Tensor]] = {}
    for name, p in _trainable_candidates(model):
        index = layer_index(name)
        if index is not None:
            seen_layer = True
            depth = index + 1
        else:
            depth = total + 1 if seen_layer else 0
        if not (p.requires_grad or include_frozen):
            continue
        groups.setdefault((depth, p.dim() > 1), []).append(p)
    result = []
    for (depth, decays), params in sorted(groups.items()):
        scale = decay ** (total + 1 - depth)
        result.append(
            {
                "params": params,
                "lr": lr * scale,
                "weight_decay": weight_decay if decays else 0.0,
                "depth": depth,
                "lr_scale": scale,
            }
        )
    if not result:
        raise FreezeError("the model has no trainable parameters to put in optimizer groups")
    return result
