"""Freezing policies, verified by which parameters change after one optimizer step."""

import pytest
import torch
from helpers import tiny, tokens

from lowrank import freeze
from lowrank.freeze import FreezeError, GradualUnfreezing, Stage
from lowrank.models import prepare_model
from lowrank.optim import PagedAdamW


def _step(model, optimizer=None):
    """One AdamW step on a LM loss over every floating parameter; return the names whose values changed."""
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.is_floating_point()]
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids = tokens(seed=3)
    kwargs = {"labels": torch.tensor([0, 1])} if "Bert" in type(model).__name__ else {"labels": ids}
    model(ids, **kwargs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def _nonzero_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def _names(model, pattern=""):
    return {n for n, p in model.named_parameters() if p.is_floating_point() and pattern in n}


def test_adapters_only_changes_only_lora_and_saved_modules():
    model = _nonzero_adapters(prepare_model(tiny("bert"), r=2, alpha=4))
    freeze.full(model)  # start from everything trainable, then restrict
    trainable = freeze.adapters_only(model)
    expected = _names(model, "lora_") | {"classifier.weight", "classifier.bias"}
    assert set(trainable) == expected
    assert _step(model) == expected


def test_head_only_trains_only_the_classifier():
    model = tiny("bert")
    assert set(freeze.head_only(model)) == {"classifier.weight", "classifier.bias"}
    assert _step(model) == {"classifier.weight", "classifier.bias"}


def test_full_trains_every_float_parameter_but_not_nf4_bytes():
    model = _nonzero_adapters(prepare_model(tiny("llama"), r=2, alpha=4))
    packed = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    freeze.full(model)
    assert _step(model) == _names(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, packed)


def test_train_only_top_attention_and_everything_but_it():
    model = tiny("llama")
    top_attention = _names(model, "layers.1.self_attn.")
    assert set(freeze.train_only(model, match=["self_attn"], layers=range(-1, 0))) == top_attention
    assert _step(model) == top_attention
    model = tiny("llama")
    rest = _names(model) - top_attention
    assert set(freeze.train_all_except(model, match=r"\.self_attn\.", layers=[1])) == rest
    assert _step(model) == rest


def test_freeze_and_unfreeze_clear_grads_and_optimizer_state():
    model = tiny("llama")
    optimizer = PagedAdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer)
    mlp = freeze.select(model, ["mlp"])
    model(tokens(), labels=tokens()).loss.backward()
    frozen = freeze.freeze(model, ["mlp"])
    assert frozen == mlp
    params = dict(model.named_parameters())
    assert all(params[n].grad is None and not params[n].requires_grad for n in frozen)
    assert freeze.drop_frozen_state(optimizer) == len(frozen)
    optimizer.zero_grad(set_to_none=True)
    assert not (_step(model, optimizer) & set(mlp))
    assert all(params[n] not in optimizer.state for n in frozen)
    assert freeze.unfreeze(model, ["mlp"], layers=[0]) == [n for n in mlp if ".layers.0." in n]


def test_selector_errors():
    model = tiny("llama")
    with pytest.raises(FreezeError, match="selects no parameter"):
        freeze.train_only(model, match="no_such_module")
    with pytest.raises(FreezeError, match="regular expression"):
        freeze.train_only(model, match="(")
    with pytest.raises(FreezeError, match="out of range"):
        freeze.train_only(model, layers=[7])
    with pytest.raises(FreezeError, match="no LoRA adapters"):
        freeze.adapters_only(model)
    with pytest.raises(FreezeError, match="no output head"):
        freeze.head_only(tiny("llama").model)
    with pytest.raises(FreezeError, match="increasing"):
        GradualUnfreezing([Stage(5)])


def test_gradual_unfreezing_top_down_schedule():
    model = tiny("bert")
    schedule = GradualUnfreezing.top_down(model, every=2)
    optimizer = torch.optim.AdamW(freeze.discriminative_lr_groups(model, lr=1e-2, decay=0.5, include_frozen=True))
    head = {"classifier.weight", "classifier.bias"}
    layer1, layer0 = _names(model, "layer.1."), _names(model, "layer.0.")
    expected = {0: head, 1: head, 2: head | layer1, 3: head | layer1, 4: head | layer1 | layer0, 6: _names(model)}
    for step in range(7):
        changed = schedule.apply(model, step)
        assert changed == (step in (0, 2, 4, 6))
        if step in expected:
            assert set(freeze.trainable_names(model)) == expected[step]
        trained = _step(model, optimizer)
        assert trained <= set(freeze.trainable_names(model))
    with_state = {n for n, p in model.named_parameters() if p in optimizer.state}
    assert with_state == _names(model)


def test_discriminative_learning_rates_decay_with_depth():
    model = prepare_model(tiny("llama"), r=2, alpha=4, quantize=None)
    freeze.unfreeze(model, ["embed_tokens", "lm_head"])
    groups = freeze.discriminative_lr_groups(model, lr=1e-3, decay=0.8, weight_decay=0.1)
    by_depth = {}
    for group in groups:
        by_depth.setdefault(group["depth"], set()).update(id(p) for p in group["params"])
        assert group["lr"] == pytest.approx(1e-3 * 0.8 ** (3 - group["depth"]))
        assert group["weight_decay"] == (0.1 if all(p.dim() > 1 for p in group["params"]) else 0.0)
    params = dict(model.named_parameters())
    assert by_depth[0] == {id(params["model.embed_tokens.weight"])}
    assert by_depth[2] == {id(p) for n, p in params.items() if ".layers.1." in n and p.requires_grad}
    assert id(params["lm_head.weight"]) in by_depth[3]
    listed = {i for ids in by_depth.values() for i in ids}
    assert listed == {id(p) for p in model.parameters() if p.requires_grad}
    torch.optim.AdamW(groups)  # the extra keys are accepted by torch optimizers
