"""A lowrank-prepared model trains unchanged under transformers.Trainer, gradient checkpointing on."""

import copy

import pytest
import torch
import transformers
from helpers import tiny
from hf_trainer import TokenDataset, trainer_args

from lowrank.models import prepare_model
from lowrank.nn import LoRALinear
from lowrank.optim import PagedAdamW


def _train(model, tmp_path, checkpointing, reentrant=False):
    args = trainer_args(
        tmp_path,
        max_steps=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant} if checkpointing else None,
    )
    optimizer = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=(optimizer, None))
    result = trainer.train()
    return trainer, result


@pytest.mark.parametrize("reentrant", [False, True])
def test_trainer_with_gradient_checkpointing_matches_plain_training(tmp_path, reentrant):
    prepared = prepare_model(tiny("llama"), r=4, alpha=8)
    assert sum(isinstance(m, LoRALinear) for m in prepared.modules()) == 14
    packed = {n: b.clone() for n, b in prepared.named_buffers()}
    lora_before = {n: p.detach().clone() for n, p in prepared.named_parameters() if p.requires_grad}
    plain = copy.deepcopy(prepared)

    trainer, result = _train(prepared, tmp_path / "gc", checkpointing=True, reentrant=reentrant)
    assert prepared.model.is_gradient_checkpointing
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in prepared.named_parameters() if n in lora_before and not torch.equal(p, lora_before[n])}
    assert changed == set(lora_before)  # every adapter trained
    assert all(torch.equal(b, packed[n]) for n, b in prepared.named_buffers())  # the 4-bit base did not move
    assert all(p.grad is None for n, p in prepared.named_parameters() if n not in lora_before)

    if reentrant:  # one comparison with plain training (below) is enough
        return
    _train(plain, tmp_path / "plain", checkpointing=False)
    for (name, a), b in zip(prepared.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_trainer_checkpoints_resume_to_the_same_adapters(tmp_path):
    def run(model, max_steps, resume=None):
        args = trainer_args(tmp_path, max_steps=max_steps)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(4))
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight = run(prepare_model(tiny("llama"), r=4, alpha=8), max_steps=2)
    assert (tmp_path / "checkpoint-1" / "model.safetensors").is_file()  # 4-bit layers + adapters, safetensors
    fresh = tiny("llama")
    torch.manual_seed(123)  # a different adapter init: everything must come from the checkpoint
    fresh = prepare_model(fresh, r=4, alpha=8)
    assert not torch.equal(
        fresh.model.layers[0].self_attn.q_proj.lora_A, straight["model.layers.0.self_attn.q_proj.lora_A"]
    )
    resumed = run(fresh, max_steps=2, resume=str(tmp_path / "checkpoint-1"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
