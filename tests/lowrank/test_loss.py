"""``lowrank.loss``: summed per-target losses and the autocast context of a precision name."""

import pytest
import torch
import torch.nn.functional as F

from lowrank.data import IGNORE_INDEX
from lowrank.loss import PRECISIONS, autocast_for, loss_sum


class Logits(torch.nn.Module):
    """A model that returns fixed logits (ignores its inputs)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        return self.logits


def test_classification_loss_is_the_sum_over_examples():
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": torch.zeros(3, 2), "attention_mask": torch.ones(3, 2), "labels": torch.tensor([0, 3, 1])}
    total, out = loss_sum(Logits(logits), batch, "classification")
    assert out is logits
    assert total.item() == pytest.approx(F.cross_entropy(logits, batch["labels"], reduction="mean").item() * 3)


def test_generation_loss_sums_next_token_losses_over_labelled_positions():
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 1, IGNORE_INDEX]])
    batch = {"input_ids": torch.zeros(2, 4), "attention_mask": torch.ones(2, 4), "labels": labels}
    total, _ = loss_sum(Logits(logits), batch, "generation")
    # position t predicts token t+1
    expected = sum(
        F.cross_entropy(logits[b, t - 1 : t], labels[b, t : t + 1]).item()
        for b in range(2)
        for t in range(1, 4)
        if labels[b, t] != IGNORE_INDEX
    )
    assert total.item() == pytest.approx(expected)


def test_autocast_for_each_precision():
    cpu = torch.device("cpu")
    assert PRECISIONS == ("auto", "bf16", "fp32")
    with autocast_for("bf16", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    for precision in ("auto", "fp32"):  # auto is fp32 on the CPU
        with autocast_for(precision, cpu):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision='fp16': expected one of"):
        autocast_for("fp16", cpu)
