"""save_pretrained on lowrank models: refused with the right advice while adapters are attached, transformers'
own once merged, and the bitsandbytes format for a loaded 4-bit model (read back with identical logits)."""

import copy
import importlib.util

import pytest
import torch
import transformers
from checkpoints import tiny_model, tokens, write_checkpoint

import lowrank
from lowrank.loading import load_pretrained
from lowrank.saving import SavePretrainedError


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_prepared_model_refuses_save_pretrained(tmp_path, quantize):
    model = lowrank.prepare_model(tiny_model("llama"), r=4, quantize=quantize)
    target = tmp_path / "out"
    for m in (model, copy.deepcopy(model)):
        with pytest.raises(SavePretrainedError, match="save_adapter.*save_quantized.*merge_adapters"):
            m.save_pretrained(target)
    assert not target.exists()  # nothing half-written


def test_merged_model_saves_with_transformers(tmp_path):
    model = lowrank.prepare_model(tiny_model("qwen2", tied=True), r=4)
    with torch.no_grad():  # a trained adapter: the merged checkpoint must carry it
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    merged = lowrank.merge_adapters(model)
    merged.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens()
    assert torch.equal(_logits(back, ids), _logits(merged, ids))


def test_loaded_4bit_model_saves_bitsandbytes_format(tmp_path):
    write_checkpoint(tiny_model("llama", tied=True), tmp_path / "dense", sharded=True)
    model = load_pretrained(tmp_path / "dense", dtype=torch.float32)
    model.save_pretrained(tmp_path / "q4")
    config = lowrank.files.read_json(tmp_path / "q4" / "config.json")
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    ids = tokens()
    expected = _logits(model, ids)
    assert torch.equal(_logits(load_pretrained(tmp_path / "q4", dtype=torch.float32), ids), expected)
    prepared = lowrank.from_pretrained(tmp_path / "q4", dtype=torch.float32, r=4)
    assert torch.equal(_logits(prepared, ids), expected)
    with pytest.raises(TypeError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "other", max_shard_size="1MB")
    if importlib.util.find_spec("bitsandbytes") is not None:  # transformers + bitsandbytes read the same files
        bnb = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q4", dtype=torch.float32).eval()
        import bitsandbytes

        layers = [n for n, m in bnb.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
        assert layers
        for name in layers:
            m = bnb.get_submodule(name)
            expected_w = bitsandbytes.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            assert torch.equal(model.get_submodule(name).dequantize(expected_w.dtype), expected_w), name
        assert torch.equal(bnb.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_trainer_checkpoint_of_a_prepared_model_is_refused_by_from_pretrained(tmp_path):
    """transformers.Trainer saves through save_pretrained(dir, state_dict=...): let through, marked as such."""
    model = lowrank.prepare_model(tiny_model("llama"), r=4)
    model.save_pretrained(tmp_path, state_dict=None, is_main_process=True)
    assert (tmp_path / "model.safetensors").is_file()
    config = lowrank.files.read_json(tmp_path / "config.json")
    assert config["quantization_config"]["quant_method"] == "lowrank_prepared"
    with pytest.raises(lowrank.loading.CheckpointLoadError, match="lowrank_prepared"):
        lowrank.from_pretrained(tmp_path)
