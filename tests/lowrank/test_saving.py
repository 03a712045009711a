"""save_pretrained on lowrank models: refused with the right advice while adapters are attached, transformers'
own once merged, the bitsandbytes format for a loaded 4-bit model (read back with identical logits), and a
prepared checkpoint for ``save_pretrained(dir, state_dict=...)`` / transformers.Trainer: transformers refuses it
loudly, Trainer resumes it, lowrank.from_pretrained rebuilds it with identical state and logits."""

import copy
import importlib.util
import json

import pytest
import torch
import transformers
from checkpoints import tiny_model, tokens, word_tokenizer, write_checkpoint
from hf_trainer import TokenDataset, trainer_args

import lowrank
from lowrank.loading import CheckpointLoadError, load_pretrained
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


#: transformers' refusal of a prepared checkpoint names lowrank and every right call
REFUSAL = r"lowrank-prepared.*lowrank\.from_pretrained.*save_adapter.*save_quantized.*merge_adapters"


def _train_adapters(model, seed=1):
    """Trained-looking adapters (B != 0, DoRA magnitudes moved), so a lost or re-initialised adapter shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return model


def _second_adapter(model):
    lowrank.add_adapter(model, "second", r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    return lowrank.set_adapter(model, ["default", "second"])


# (arch, tied, prepare_model options, a step after prepare_model, save_pretrained options)
PREPARED_CASES = {
    "llama-nf4": ("llama", False, {}, None, {}),
    "llama-tied-sharded": ("llama", True, {}, None, {"max_shard_size": "60KB"}),
    "qwen2-dense-base": ("qwen2", True, {"quantize": None}, None, {}),
    "gpt2-dora-rank-pattern": ("gpt2", True, {"use_dora": True, "rank_pattern": {"c_attn": 2}}, None, {}),
    "llama-fp4-compute-bf16": ("llama", False, {"quantize": "fp4", "compute_dtype": torch.bfloat16}, None, {}),
    "llama-pissa": ("llama", False, {"init": "pissa"}, None, {}),  # the 4-bit base holds the residual
    "llama-two-adapters": ("llama", False, {}, _second_adapter, {}),
    "bert-classifier": ("bert", False, {"bias": "lora_only"}, None, {}),
    "llama-bf16-base": ("llama", False, {"dtype": torch.bfloat16}, None, {}),  # bf16 base, fp32 adapters
}


def _prepared(case):
    arch, tied, options, after, _ = PREPARED_CASES[case]
    options = dict(options)
    base = tiny_model(arch, tied=tied)
    if "dtype" in options:  # built as from_pretrained(dtype=...) builds it (computed buffers stay fp32)
        weights = base.state_dict()
        base = type(base)._from_config(base.config, dtype=options.pop("dtype"))
        base.load_state_dict(weights)
    model = lowrank.prepare_model(base, r=4, alpha=8, **options)
    if after is not None:
        model = after(model)
    return _train_adapters(model).eval()


def _forward(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits


def _tied_aliases(model):
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))


def _stored_tensors(directory):
    return {k: v for f in lowrank.loading.weight_files(directory) for k, v in lowrank.files.read_safetensors(f).items()}


def _assert_same_prepared_model(back, model):
    ids = tokens()
    assert torch.equal(_forward(back, ids), _forward(model, ids))
    expected, got = model.state_dict(), back.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    buffers, want = dict(back.named_buffers()), dict(model.named_buffers())  # non-persistent ones too
    assert buffers.keys() == want.keys()
    assert all(torch.equal(buffers[k], v) for k, v in want.items())
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(back) == trainable(model)
    assert back.lowrank_adapters == model.lowrank_adapters
    assert back.lowrank_config == model.lowrank_config
    assert back.lowrank_active_adapters == model.lowrank_active_adapters
    assert _tied_aliases(back) == _tied_aliases(model)  # tied parameters are one object again
    with pytest.raises(SavePretrainedError):  # the rebuilt model is guarded like the original
        back.save_pretrained("never-written")


def _auto_class(model):
    return (
        transformers.AutoModelForSequenceClassification
        if lowrank.models.task_type_of(model) == "SEQ_CLS"
        else transformers.AutoModelForCausalLM
    )


@pytest.mark.parametrize("case", sorted(PREPARED_CASES))
def test_state_dict_save_is_refused_by_transformers_and_rebuilt_by_lowrank(tmp_path, case):
    """save_pretrained(dir, state_dict=...) (Trainer's call): transformers' from_pretrained raises naming the
    right calls (Auto class and the concrete class); lowrank.from_pretrained gives the same model back."""
    model = _prepared(case)
    plain_class = type(model)
    model.save_pretrained(tmp_path, state_dict=model.state_dict(), **PREPARED_CASES[case][4])
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert (tmp_path / "model.safetensors.index.json").is_file() == ("max_shard_size" in PREPARED_CASES[case][4])
    config = lowrank.files.read_json(tmp_path / "config.json")
    assert config["quantization_config"]["quant_method"] == "lowrank_prepared"
    for loader in (_auto_class(model), plain_class):
        with pytest.raises(ValueError, match=REFUSAL):
            loader.from_pretrained(tmp_path)
    # handed another config (so config.json is never read), transformers still raises: the sentinel's size
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _auto_class(model).from_pretrained(tmp_path, config=copy.deepcopy(model.config))
    # what Trainer's resume does: load_state_dict(strict=False) into the same prepared model: nothing
    # unexpected (the sentinel is dropped), nothing missing but tied aliases
    result = copy.deepcopy(model).load_state_dict(_stored_tensors(tmp_path), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= _tied_aliases(model)
    _assert_same_prepared_model(lowrank.from_pretrained(tmp_path), model)
    stored = model.get_input_embeddings().weight.dtype  # repeating the stored dtype is allowed
    _assert_same_prepared_model(lowrank.from_pretrained(tmp_path, dtype=stored, verbose=False), model)


def test_every_transformers_entry_point_refuses_a_prepared_checkpoint(tmp_path):
    model = _prepared("llama-nf4")
    model.save_pretrained(tmp_path, state_dict=None)
    loads = {
        "AutoModel": lambda: transformers.AutoModel.from_pretrained(tmp_path),
        "AutoModelForCausalLM": lambda: transformers.AutoModelForCausalLM.from_pretrained(tmp_path),
        "LlamaForCausalLM": lambda: transformers.LlamaForCausalLM.from_pretrained(tmp_path),
        "use_safetensors=False": lambda: transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, use_safetensors=False
        ),
        "config from the directory": lambda: transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, config=transformers.AutoConfig.from_pretrained(tmp_path)
        ),
        "pipeline": lambda: transformers.pipeline("text-generation", model=str(tmp_path), tokenizer=word_tokenizer()),
    }
    if importlib.util.find_spec("bitsandbytes") is not None:
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        loads["quantization_config=bitsandbytes"] = lambda: transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=bnb
        )
    for how, load in loads.items():
        with pytest.raises(ValueError, match=REFUSAL):
            load()
            pytest.fail(f"{how} loaded a prepared checkpoint")


def test_prepared_model_load_state_dict_drops_only_the_sentinel():
    model = _prepared("llama-nf4")
    state = model.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"  # the first LoRA layer: where a checkpoint puts the sentinel
    assert model.load_state_dict({**state, key: lowrank.saving.SENTINEL.clone()}).unexpected_keys == []
    plain_weight = torch.zeros(64, 64)  # a real (plain model's) weight is still reported, never swallowed
    with pytest.raises(RuntimeError, match="Unexpected key.*q_proj.weight"):
        model.load_state_dict({**state, key: plain_weight})
    assert copy.deepcopy(model).load_state_dict({**state, key: lowrank.saving.SENTINEL.clone()}).unexpected_keys == []


def test_pissa_initial_split_survives_a_prepared_checkpoint(tmp_path):
    """save_adapter(convert_to_lora=True) needs each layer's initial PiSSA split (non-persistent buffers): the
    prepared checkpoint stores it, so the rebuilt model converts to the same rank-2r LoRA."""
    model = _prepared("llama-pissa")
    model.save_pretrained(tmp_path / "ckpt", state_dict=None)
    back = lowrank.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(
        back.model.layers[1].mlp.up_proj.lora_B_initial, model.model.layers[1].mlp.up_proj.lora_B_initial
    )
    lowrank.save_adapter(model, tmp_path / "want", convert_to_lora=True)
    lowrank.save_adapter(back, tmp_path / "got", convert_to_lora=True)
    want = lowrank.files.read_safetensors(tmp_path / "want" / "adapter_model.safetensors")
    got = lowrank.files.read_safetensors(tmp_path / "got" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in want.items())


def test_prepared_checkpoint_load_options_and_bad_input(tmp_path):
    model = _prepared("llama-nf4")
    model.save_pretrained(tmp_path, state_dict=None)
    with pytest.raises(CheckpointLoadError, match=r"prepared checkpoint.*\['alpha', 'r'\]"):
        lowrank.from_pretrained(tmp_path, r=8, alpha=16)  # the adapters come from the checkpoint
    with pytest.raises(CheckpointLoadError, match="saved in torch.float32.*leave dtype unset"):
        lowrank.from_pretrained(tmp_path, dtype=torch.bfloat16)
    with pytest.raises(CheckpointLoadError, match="lowrank.from_pretrained"):
        lowrank.loading.load_pretrained(tmp_path)  # a base-only loader cannot read adapters
    back = lowrank.from_pretrained(tmp_path, compute_dtype=torch.bfloat16)  # a load-time choice, like at prepare
    assert {m.compute_dtype for m in back.modules() if isinstance(m, lowrank.nn.LinearNF4)} == {torch.bfloat16}

    good = lowrank.files.read_json(tmp_path / "config.json")

    def broken(change):
        config = json.loads(json.dumps(good))
        change(config["quantization_config"])
        lowrank.files.write_json(tmp_path / "config.json", config)

    broken(lambda q: q["adapters"][0].update(rank=4))
    with pytest.raises(CheckpointLoadError, match=r"unknown keys \['rank'\]"):
        lowrank.from_pretrained(tmp_path)
    broken(lambda q: q.update(format_version=99))
    with pytest.raises(CheckpointLoadError, match="format_version 99"):
        lowrank.from_pretrained(tmp_path)
    broken(lambda q: q.update(active_adapters=["nope"]))
    with pytest.raises(CheckpointLoadError, match="active_adapters"):
        lowrank.from_pretrained(tmp_path)
    broken(lambda q: q["adapters"][0].update(target_modules=["model.layers.0.self_attn.q_proj"]))
    with pytest.raises(CheckpointLoadError, match="not part of the prepared"):  # a structure that does not fit
        lowrank.from_pretrained(tmp_path)
    lowrank.files.write_json(tmp_path / "config.json", good)
    tensors = lowrank.files.read_safetensors(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.lora_B"]
    lowrank.files.write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(CheckpointLoadError, match=r"no tensor for \['model.layers.1.mlp.down_proj.lora_B'\]"):
        lowrank.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointLoadError, match="model.safetensors cannot be read"):
        lowrank.from_pretrained(tmp_path)


def test_prepared_checkpoint_save_refusals_and_atomicity(tmp_path, monkeypatch):
    model = _prepared("llama-nf4")
    with pytest.raises(SavePretrainedError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", state_dict=None, push_to_hub=True)
    assert not (tmp_path / "hub").exists()
    layer = model.model.layers[0].self_attn.v_proj
    with pytest.warns(UserWarning):
        layer.merge()
    with pytest.raises(SavePretrainedError, match="merged in place.*unmerge"):
        model.save_pretrained(tmp_path / "merged", state_dict=None)
    layer.unmerge()

    # a save that dies half-way leaves neither weights nor an unmarked config behind
    target = tmp_path / "ckpt"
    real = type(model).save_pretrained

    def dies_after_writing(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target, state_dict=None)
    assert list(target.iterdir()) == []
    monkeypatch.setattr(type(model), "save_pretrained", real)

    # saving again into the same directory replaces the weights of the earlier save (no stale shards or index)
    model.save_pretrained(target, state_dict=None, max_shard_size="60KB")
    assert (target / "model.safetensors.index.json").is_file()
    model.save_pretrained(target, state_dict=None)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    _assert_same_prepared_model(lowrank.from_pretrained(target), model)


class _Snapshots(transformers.TrainerCallback):
    """The model's state dict at every checkpoint Trainer writes."""

    def __init__(self):
        self.at = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trainer(model, out, max_steps, callbacks=()):
    args = trainer_args(out, max_steps)
    return transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(4), callbacks=list(callbacks))


def _prepared_llama(seed=0):
    base = tiny_model("llama")  # the same base weights every time
    torch.manual_seed(seed)  # the adapters' init
    return lowrank.prepare_model(base, r=4, alpha=8)


def test_trainer_checkpoints_and_save_model_are_refused_by_transformers_resumed_and_rebuilt(tmp_path):
    """A real transformers.Trainer run: checkpoint-N/ (_save_checkpoint) and trainer.save_model() are refused
    by transformers' from_pretrained, rebuilt by lowrank.from_pretrained exactly as they were at that step, and
    resume_from_checkpoint continues with the same weights."""
    model = _prepared_llama()
    snapshots = _Snapshots()
    trainer = _trainer(model, tmp_path / "run", max_steps=2, callbacks=[snapshots])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    straight = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(snapshots.at) == [1, 2]

    for directory, expected in (
        (tmp_path / "run" / "checkpoint-1", snapshots.at[1]),
        (tmp_path / "run" / "checkpoint-2", snapshots.at[2]),
        (tmp_path / "final", model.state_dict()),
    ):
        with pytest.raises(ValueError, match=REFUSAL):
            transformers.AutoModelForCausalLM.from_pretrained(directory)
        back = lowrank.from_pretrained(directory)
        got = back.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), directory
    ids = tokens()
    assert torch.equal(_forward(lowrank.from_pretrained(tmp_path / "final"), ids), _forward(model.eval(), ids))

    # Trainer's own resume reads the marked directory into a fresh prepared model and continues identically;
    # its load_state_dict(strict=False) finds nothing missing or unexpected (so Trainer warns about nothing)
    fresh = _prepared_llama(seed=123)
    loaded = lowrank.files.read_safetensors(tmp_path / "run" / "checkpoint-1" / "model.safetensors")
    result = copy.deepcopy(fresh).load_state_dict(loaded, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (
        [],
        [],
    )  # another adapter init: every value must come from the checkpoint
    assert not torch.equal(
        fresh.model.layers[0].self_attn.q_proj.lora_A, snapshots.at[1]["model.layers.0.self_attn.q_proj.lora_A"]
    )
    _trainer(fresh, tmp_path / "run", max_steps=2).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    resumed = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
