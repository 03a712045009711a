"""Helpers for the tests that hold lowrank's adapters against PEFT (the oracle): tiny models with biases,
PEFT models built and loaded quietly, and the parameter-name map between the two."""

import copy
import warnings

import torch
import transformers
from helpers import dequantized_copy  # noqa: F401  (re-exported: the one copy lives in helpers)

VOCAB = 96


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer Llama (hidden 64, k/v projections 64 -> 32) in eval mode, fp32, built from config."""
    torch.manual_seed(seed)
    config = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT-2 (Conv1D layers with biases, hidden 64) in eval mode, fp32."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2 starts with zero biases: make them visible
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def tokens(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens() if ids is None else ids).logits


def randomize(params, seed: int = 0, std: float = 0.1) -> None:
    """Overwrite tensors with reproducible random values (adapters that start at zero become visible)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def peft_model(base, **config):
    """``peft.get_peft_model`` on a copy of ``base`` with random A and B (``init_lora_weights=False``)."""
    import peft

    config.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()


def peft_load(base, directory, **kwargs):
    """``PeftModel.from_pretrained`` on a copy of ``base``, failing on its 'missing/unexpected keys' warning."""
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory, **kwargs).eval()
    problems = [str(w.message) for w in caught if any(k in str(w.message).lower() for k in ("missing", "unexpected"))]
    assert not problems, problems
    return model


def peft_name(name: str) -> str:
    """A PEFT parameter name in lowrank's spelling (``base_model.model.`` and ``.default`` dropped)."""
    name = name.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        name = name.replace(f".{part}.default.weight", f".{part}").replace(f".{part}.default", f".{part}")
    return name


def trainable(model, peft_names: bool = False) -> dict[str, torch.nn.Parameter]:
    return {(peft_name(n) if peft_names else n): p for n, p in model.named_parameters() if p.requires_grad}


def grads_after_backward(model, peft_names: bool = False) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(tokens()).logits
    (out.float() ** 2).mean().backward()
    return {n: p.grad.detach().clone() for n, p in trainable(model, peft_names).items()}
