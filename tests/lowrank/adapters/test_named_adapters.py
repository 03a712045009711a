"""Named adapters (add / load / set / delete / save in PEFT's layout), disabling, and safe merging."""

import copy
import os

import pytest
import torch
from peft_oracle import dequantized_copy, logits, peft_load, peft_model, randomize, tiny_llama, tokens

import lowrank
from lowrank.adapters import AdapterError, load_adapter, merge_adapters, save_adapter
from lowrank.models import prepare_model
from lowrank.nn import LoRALinear

pytest.importorskip("peft")
pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """PEFT's own two-adapter directory: 'default' (q, v; r=4) at the root, 'other' (q, up; r=2) in other/."""
    base = tiny_llama()
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    import peft

    theirs.add_adapter(
        "other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    )
    path = tmp_path_factory.mktemp("peft")
    theirs.save_pretrained(path)
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    return path


def peft_with_both(directory):
    model = peft_load(tiny_llama(), directory)
    model.load_adapter(os.path.join(directory, "other"), adapter_name="other")
    return model.eval()


def lowrank_with_both(directory):
    model = load_adapter(tiny_llama(), directory)
    return load_adapter(model, os.path.join(directory, "other"), adapter_name="other").eval()


def test_two_adapters_switch_by_name_like_peft(peft_dir, tmp_path):
    theirs, ours = peft_with_both(peft_dir), lowrank_with_both(peft_dir)
    base = logits(tiny_llama())
    assert lowrank.models.active_adapters(ours) == ["default"]  # loading does not activate (as PEFT)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    for active in ("other", ["default", "other"], "default"):
        theirs.base_model.set_adapter(active)
        lowrank.set_adapter(ours, active)
        torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5, msg=str(active))
        assert (logits(ours) - base).abs().max() > 1e-3
    # lowrank writes PEFT's layout; PEFT reads both adapters back
    save_adapter(ours, tmp_path)
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "other" / "adapter_config.json")
    back = peft_with_both(tmp_path)
    for active in ("default", "other"):
        back.base_model.set_adapter(active)
        lowrank.set_adapter(ours, active)
        torch.testing.assert_close(logits(back), logits(ours), atol=1e-5, rtol=1e-5)
    save_adapter(ours, tmp_path / "only", adapter_name="other")
    assert sorted(os.listdir(tmp_path / "only")) == ["other"]


def test_disable_adapters_runs_the_base_exactly():
    base = tiny_llama()
    model = prepare_model(copy.deepcopy(base), r=4, alpha=8, quantize=None)
    lowrank.add_adapter(model, "b", r=2, alpha=2, target_modules=["q_proj", "lm_head"])
    randomize([p for n, p in model.named_parameters() if "lora_" in n])
    lowrank.set_adapter(model, ["default", "b"])
    adapted = logits(model)
    with lowrank.disable_adapters(model):
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), adapted)
    # a 4-bit base: disabled equals the NF4 base without adapters
    quantized = prepare_model(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj"])
    bare = prepare_model(copy.deepcopy(base), r=4, alpha=8, target_modules=["k_proj"])  # q_proj left as plain NF4
    randomize([p for n, p in quantized.named_parameters() if "lora_" in n])
    with lowrank.disable_adapters(quantized):
        with lowrank.disable_adapters(bare):
            assert torch.equal(logits(quantized), logits(bare))


def test_training_one_adapter_leaves_the_other_untouched():
    model = prepare_model(tiny_llama(), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    lowrank.add_adapter(model, "b", r=2, alpha=4, target_modules=["q_proj", "o_proj"])
    randomize([p for n, p in model.named_parameters() if "lora_" in n])
    lowrank.set_adapter(model, "b")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(
        "extra_adapters.b." in n or n.endswith("o_proj.lora_A") or n.endswith("o_proj.lora_B") for n in trained
    )
    assert set(lowrank.freeze.adapters_only(model)) == trained
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(tokens(), labels=tokens()).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, before[name]) != (name in trained), name


def test_delete_adapter_restores_layers_and_promotes():
    base = tiny_llama()
    model = prepare_model(copy.deepcopy(base), r=4, alpha=8, quantize=None, target_modules=["q_proj"])
    randomize([p for n, p in model.named_parameters() if "lora_" in n])
    only_default = logits(model)
    lowrank.add_adapter(model, "b", r=2, alpha=4, target_modules=["q_proj", "up_proj"])
    randomize([p for n, p in model.named_parameters() if "extra_adapters" in n or "up_proj.lora" in n], seed=5)
    lowrank.set_adapter(model, "b")
    only_b = logits(model)
    lowrank.delete_adapter(model, "b")
    assert not isinstance(model.model.layers[0].mlp.up_proj, LoRALinear)  # only 'b' was there: the base is back
    assert lowrank.models.active_adapters(model) == ["default"]
    assert torch.equal(logits(model), only_default)
    lowrank.add_adapter(model, "c", r=2, alpha=4, target_modules=["q_proj"])
    lowrank.delete_adapter(model, "default")  # 'c' becomes the layers' own adapter
    assert model.model.layers[0].self_attn.q_proj.adapter_name == "c"
    assert model.lowrank_config.adapter_name == "c"
    assert torch.equal(logits(model), logits(base))  # c starts at B = 0
    del only_b


def test_safe_merge_refuses_non_finite_weights():
    model = prepare_model(tiny_llama(), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj gives 64 non-finite"):
        merge_adapters(model, safe_merge=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)  # nothing was merged
    merged = merge_adapters(model)  # without the check it merges (as PEFT's default)
    assert not torch.isfinite(merged.model.layers[1].self_attn.v_proj.weight).all()


def test_bad_adapter_names(peft_dir):
    model = lowrank_with_both(peft_dir)
    with pytest.raises(
        ValueError, match=r"adapter 'nope' does not exist; the model has adapters \['default', 'other'\]"
    ):
        lowrank.set_adapter(model, ["default", "nope"])
    with pytest.raises(ValueError, match="adapter 'nope' does not exist"):
        lowrank.delete_adapter(model, "nope")
    with pytest.raises(ValueError, match="adapter 'other' already exists"):
        lowrank.add_adapter(model, "other")
    with pytest.raises(ValueError, match="init must be 'kaiming' or 'gaussian', got 'pissa'"):
        lowrank.add_adapter(model, "p", init="pissa")
    with pytest.raises(ValueError, match="at least one adapter name"):
        lowrank.set_adapter(model, [])
    with pytest.raises(AdapterError, match="adapter 'nope' does not exist"):
        save_adapter(model, peft_dir / "x", adapter_name="nope")
    with pytest.raises(ValueError, match="the model carries no LoRA adapters"):
        lowrank.add_adapter(tiny_llama(), "a")
    with pytest.raises(ValueError, match="only adapter"):
        lowrank.delete_adapter(prepare_model(tiny_llama(), r=2, alpha=2), "default")
    # an adapter that does not fit the base's shapes: the error names the module and both shapes
    other = tiny_llama(intermediate_size=80)
    prepare_model(other, r=4, alpha=8, quantize=None, target_modules=["q_proj", "v_proj"])
    with pytest.raises(
        AdapterError, match=r"up_proj.lora_B: adapter tensor has shape \(96, 2\), the model needs \(80, 2\)"
    ):
        load_adapter(other, peft_dir / "other", adapter_name="other")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_mixed_batch_matches_peft_adapter_names(peft_dir, quantize):
    theirs = peft_load(dequantized_copy(tiny_llama()) if quantize else tiny_llama(), peft_dir)
    theirs.load_adapter(os.path.join(peft_dir, "other"), adapter_name="other")
    ours = load_adapter(tiny_llama(), peft_dir, quantize=quantize)
    load_adapter(ours, os.path.join(peft_dir, "other"), adapter_name="other")
    names = ["other", "__base__", "default", "other"]
    ids = tokens(batch=4)
    with torch.no_grad():
        expected = theirs(ids, adapter_names=names).logits
    with lowrank.mixed_batch(ours, names):
        got = logits(ours, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # each row equals running that adapter alone
    for row, name in enumerate(names):
        if name == "__base__":
            with lowrank.disable_adapters(ours):
                alone = logits(ours, ids[row : row + 1])
        else:
            lowrank.set_adapter(ours, name)
            alone = logits(ours, ids[row : row + 1])
        torch.testing.assert_close(got[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    assert all(m.batch_adapter_names is None for m in lowrank.models.adapter_layers(ours).values())
    with pytest.raises(ValueError, match=r"adapter_names \['nope'\] do not exist"):
        lowrank.mixed_batch(ours, ["nope", "default"])
    with lowrank.mixed_batch(ours, ["default"]), pytest.raises(ValueError, match="batch = 1 adapter names"):
        logits(ours, ids)
