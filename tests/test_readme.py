"""The README's Python blocks run as written (on tiny models built from config, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers
from helpers import dequantized_copy

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    text = README.read_text()
    body = text.split(f"<!-- section:{section} -->", 1)[1].split(f"<!-- /section:{section} -->", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_models_block_runs_as_written(tmp_path, monkeypatch):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    namespace = {"local_dir": str(tmp_path / "tiny")}
    exec(compile(python_block("api-models"), "README.md[api-models]", "exec"), namespace)
    dense = namespace["dense"]
    assert not any(type(m).__name__ in ("LinearNF4", "LoRALinear") for m in dense.modules())
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    assert (tmp_path / "out" / "q4" / "model.safetensors").is_file()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the adapter loaded into the reloaded 4-bit base gives the prepared model's output
        want = namespace["model"](input_ids=ids).logits.float()
        got = namespace["again"](input_ids=ids).logits.float()
        fresh = namespace["fresh"](input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert any(type(m).__name__ == "LinearNF4" for m in namespace["fresh"].modules())  # the NF4 base, rebuilt
    torch.testing.assert_close(fresh, want, atol=2e-2, rtol=2e-2)


def test_peft_block_runs_as_written(tmp_path, monkeypatch):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    monkeypatch.chdir(tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = dequantized_copy(base)(ids).logits  # what the 4-bit base computes
    namespace = {"model": base, "ids": ids}
    with torch.no_grad():
        exec(compile(python_block("api-peft"), "README.md[api-peft]", "exec"), namespace)
    assert (tmp_path / "out" / "adapters" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "adapters" / "style" / "adapter_model.safetensors").is_file()
    # disable_adapters ran the 4-bit base alone
    torch.testing.assert_close(namespace["reference_logits"], before, atol=1e-4, rtol=1e-4)
