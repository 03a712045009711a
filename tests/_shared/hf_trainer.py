"""transformers.Trainer set-up shared by the tests that train a prepared model under it (CPU, offline)."""

from __future__ import annotations

import torch
import transformers
from helpers import tokens


class TokenDataset(torch.utils.data.Dataset):
    """``n`` causal-LM examples of 8 tokens (labels = inputs), each from its own seed."""

    def __init__(self, n: int = 8):
        self.ids = [tokens(1, 8, seed=i)[0] for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_args(output_dir, max_steps: int, **overrides) -> transformers.TrainingArguments:
    """Deterministic CPU arguments: batch 2, constant lr 1e-2, a checkpoint every step, no trackers."""
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)
