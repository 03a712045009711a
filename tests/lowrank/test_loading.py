"""lowrank.from_pretrained: streamed loading equals transformers' from_pretrained + prepare_model; 4-bit
checkpoints read as stored; bounded peak memory; every bad input names the file and the tensor."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from checkpoints import CASES, tiny_model, tokens, write_checkpoint

import lowrank
from lowrank.files import FileFormatError
from lowrank.loading import CheckpointLoadError, load_pretrained
from lowrank.models import prepare_model
from lowrank.nn import LinearNF4, LoRALinear

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _reference(directory, cls, dtype, **options):
    torch.manual_seed(1)
    return prepare_model(cls.from_pretrained(directory, dtype=dtype).eval(), **options)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize(("arch", "tied"), CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def test_streamed_load_equals_transformers_then_prepare(tmp_path, arch, tied, sharded):
    original = tiny_model(arch, tied)
    write_checkpoint(original, tmp_path, sharded)
    dtype = torch.float32 if arch in ("llama", "bert") else torch.bfloat16
    torch.manual_seed(1)
    ours = lowrank.from_pretrained(tmp_path, dtype=dtype, r=4)
    ref = _reference(tmp_path, type(original), dtype, r=4)
    assert type(ours) is type(original)
    ids = tokens()
    assert torch.equal(_logits(ours, ids), _logits(ref, ids))
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    quantized = [n for n, m in ours.named_modules() if isinstance(m, LinearNF4)]
    assert len(quantized) == len([m for m in ref.modules() if isinstance(m, LinearNF4)]) > 0
    assert lowrank.summary(ours).trainable_params == lowrank.summary(ref).trainable_params > 0
    get_out = ours.get_output_embeddings() if arch != "bert" else None
    if get_out is not None:
        assert (get_out.weight is ours.get_input_embeddings().weight) == tied
    if arch == "gpt2":  # Conv1D layers became Linear-semantics 4-bit layers that remember it
        attn = ours.transformer.h[0].attn.c_attn
        assert isinstance(attn, LoRALinear) and attn.base_layer._lowrank_from_conv1d
    assert not any(p.device.type == "meta" for p in ours.parameters())


def test_dense_streaming_and_config_overrides(tmp_path):
    """quantize=None streams dense frozen bases; a base checkpoint gains a newly initialised classifier head."""
    write_checkpoint(tiny_model("llama"), tmp_path)
    dense = load_pretrained(tmp_path, quantize=None, dtype=torch.float32)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(_logits(dense, tokens()), _logits(ref, tokens()))
    assert not any(isinstance(m, LinearNF4) for m in dense.modules())
    assert not any(p.requires_grad for p in dense.parameters())
    with pytest.warns(UserWarning, match="newly initialised"):
        cls = lowrank.from_pretrained(
            tmp_path,
            auto_class=transformers.AutoModelForSequenceClassification,
            config_overrides={"num_labels": 5, "pad_token_id": 0},
            dtype=torch.float32,
            r=4,
        )
    assert isinstance(cls, transformers.LlamaForSequenceClassification)
    assert cls.score.weight.shape == (5, 64) and cls.score.weight.abs().sum() > 0
    assert cls.score.weight.requires_grad  # the new head is trained in full (modules_to_save)
    with torch.no_grad():
        out = cls(input_ids=tokens()).logits
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_save_quantized_checkpoint_is_read_without_dequantizing(tmp_path, sharded):
    model = prepare_model(tiny_model("qwen2", tied=True), r=4)
    lowrank.save_quantized(model, tmp_path)
    if sharded:  # re-shard the same tensors: a layer's 4-bit entries may straddle two files
        tensors = lowrank.files.read_safetensors(tmp_path / "model.safetensors")
        (tmp_path / "model.safetensors").unlink()
        names = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in halves.items():
            lowrank.files.write_safetensors(tmp_path / shard, {k: tensors[k] for k in keys})
        weight_map = {k: shard for shard, keys in halves.items() for k in keys}
        lowrank.files.write_json(tmp_path / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    stored = lowrank.load_quantized(tmp_path) if not sharded else None
    streamed = load_pretrained(tmp_path, dtype=torch.float32)
    for name, m in model.named_modules():
        if isinstance(m, LinearNF4):
            got = streamed.get_submodule(name.removesuffix(".base_layer"))
            assert isinstance(got, LinearNF4)
            for a, b in zip(m.weight_nf4.tensors().values(), got.weight_nf4.tensors().values(), strict=True):
                assert torch.equal(a, b), name
    ids = tokens()
    if stored is not None:
        assert torch.equal(_logits(streamed, ids), _logits(stored, ids))
    prepared = lowrank.from_pretrained(tmp_path, dtype=torch.float32, r=4)
    assert torch.equal(_logits(prepared, ids), _logits(model, ids))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (the oracle) is not installed")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bitsandbytes_checkpoint_streamed(tmp_path, arch):
    dense = tmp_path / "dense"
    write_checkpoint(tiny_model(arch, tied=arch == "gpt2"), dense)
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    bnb = transformers.AutoModelForCausalLM.from_pretrained(dense, quantization_config=bnb_config, dtype=torch.float32)
    quantized = tmp_path / "bnb"
    bnb.save_pretrained(quantized, max_shard_size="60KB")
    assert (quantized / "model.safetensors.index.json").is_file()
    ours = load_pretrained(quantized, dtype=torch.float32)
    import bitsandbytes

    checked = 0
    for name, module in bnb.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):  # the stored bytes mean what bitsandbytes means
            mine = ours.get_submodule(name)
            assert isinstance(mine, LinearNF4), name
            expected = bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(mine.dequantize(expected.dtype), expected), name
            checked += 1
    assert checked == len([m for m in ours.modules() if isinstance(m, LinearNF4)]) > 0
    single = tmp_path / "single"  # the same checkpoint in one file: equal to lowrank.load_quantized
    bnb.save_pretrained(single)
    ids = tokens()
    assert torch.equal(_logits(ours, ids), _logits(lowrank.load_quantized(single), ids))


# -- bad input --------------------------------------------------------------------------------------------


def _sharded(tmp_path):
    write_checkpoint(tiny_model("llama"), tmp_path, sharded=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    return index, sorted(set(index["weight_map"].values()))


def test_error_index_names_missing_shard(tmp_path):
    _, shards = _sharded(tmp_path)
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointLoadError, match=f"{shards[1]}.*does not exist"):
        lowrank.from_pretrained(tmp_path)


def test_error_truncated_shard(tmp_path):
    _, shards = _sharded(tmp_path)
    path = tmp_path / shards[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(FileFormatError, match=f"{shards[0]}.*truncated or corrupted"):
        lowrank.from_pretrained(tmp_path)


def test_error_corrupted_header(tmp_path):
    write_checkpoint(tiny_model("llama"), tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointLoadError, match="model.safetensors.*truncated or corrupted"):
        lowrank.from_pretrained(tmp_path)


def test_error_index_lists_tensor_its_shard_lacks(tmp_path):
    index, shards = _sharded(tmp_path)
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointLoadError, match=f"{key}.*{shards[1]}"):
        lowrank.from_pretrained(tmp_path)


def test_error_shape_disagrees_with_config(tmp_path):
    write_checkpoint(tiny_model("llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointLoadError, match=r"mlp\.(gate|up|down)_proj\.weight.*model.safetensors.*expects"):
        lowrank.from_pretrained(tmp_path)


def test_error_unknown_architecture_and_missing_files(tmp_path):
    write_checkpoint(tiny_model("llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForTimeTravel"]}))
    with pytest.raises(CheckpointLoadError, match="config.json.*LlamaForTimeTravel"):
        lowrank.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileFormatError, match="config.json does not exist"):
        lowrank.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointLoadError, match="neither model.safetensors nor"):
        lowrank.from_pretrained(tmp_path)
    with pytest.raises(CheckpointLoadError, match="does not exist"):
        lowrank.from_pretrained(tmp_path / "nowhere")


def test_error_base_weight_missing(tmp_path):
    write_checkpoint(tiny_model("llama"), tmp_path)
    tensors = lowrank.files.read_safetensors(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    lowrank.files.write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(CheckpointLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        lowrank.from_pretrained(tmp_path)


def test_error_4bit_checkpoint_asked_dense(tmp_path):
    lowrank.save_quantized(prepare_model(tiny_model("llama"), r=4), tmp_path)
    with pytest.raises(CheckpointLoadError, match="4-bit checkpoint"):
        load_pretrained(tmp_path, quantize=None)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointLoadError, match="gptq"):
        load_pretrained(tmp_path)


# -- peak memory ------------------------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, lowrank
    from lowrank.loading import load_pretrained
    from safetensors import safe_open
    import transformers  # imported before the baseline: the bound is about loading, not imports
    torch.set_num_threads(1)
    transformers.LlamaForCausalLM  # the model class's module, and the quantize backend (triton when the
    lowrank.nf4.quantize(torch.ones(64))  # extension is absent) are imports too: loaded before the baseline

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    base = status("VmRSS")
    model = load_pretrained(sys.argv[1], dtype=torch.bfloat16)
    peak = status("VmHWM")
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(json.dumps({"base": base, "peak": peak, "model_bytes": model_bytes}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
def test_peak_host_memory_is_model_plus_two_tensors(tmp_path):
    """A ~300 MB bf16 checkpoint (4 shards): peak RSS over the baseline <= model + 2 x largest tensor + 150 MB."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    tensors = {n: t for n, t in skeleton.state_dict().items()}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():  # random bf16 tensors written shard by shard (never all in memory)
        current[name] = torch.randn(t.shape, dtype=torch.bfloat16) * 0.02
        size += t.numel() * 2
        if size > 80 * 2**20:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        lowrank.files.write_safetensors(tmp_path / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    shards.clear()
    current.clear()
    lowrank.files.write_json(tmp_path / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    lowrank.files.write_json(tmp_path / "config.json", {**config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    total = sum(t.numel() * 2 for t in tensors.values())
    largest = max(t.numel() * 2 for t in tensors.values())
    assert total > 250 * 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    rise = figures["peak"] - figures["base"]
    bound = figures["model_bytes"] + 2 * largest + 150 * 2**20
    assert figures["model_bytes"] < total / 2  # the linear layers really are 4-bit
    print(f"peak rose {rise / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
    assert rise <= bound, f"peak rose {rise / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB ({figures})"


@pytest.mark.gpu
def test_cuda_load_peak_device_memory_is_model_plus_two_tensors(tmp_path):
    """device="cuda": each weight is quantized on the GPU as it arrives; peak <= model + 2 x largest tensor."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20MB")
    with torch.device("meta"):
        sizes = [t.numel() * 2 for t in transformers.LlamaForCausalLM(config).state_dict().values()]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    assert all(t.device.type == "cuda" for t in tensors.values())
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert peak <= model_bytes + 2 * max(sizes), (peak, model_bytes, max(sizes))
    ref = prepare_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda(), r=4)
    ours = prepare_model(model, r=4)
    ids = tokens().cuda()
    assert torch.equal(_logits(ours, ids), _logits(ref, ids))
