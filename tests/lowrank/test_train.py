"""The training loop on tiny models: schedule, accumulation, resume bit for bit, checkpoints, policies."""

import json
import math

import pytest
import torch
import transformers
from helpers import tiny_llama

from lowrank import freeze
from lowrank.models import prepare_model
from lowrank.nn import LoRALinear
from lowrank.train import CheckpointError, ConfigError, DeltaTracker, TrainConfig, list_checkpoints, lr_factor, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_bert(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return transformers.BertForSequenceClassification(config)


def qlora_bert(seed=0):
    model = tiny_bert(seed)
    return prepare_model(model, r=4, alpha=8, dropout=0.1, modules_to_save=["classifier"])


def cls_data(n=24, seed=1):
    """Class = which marker token (5, 6, 7) appears among random tokens: learnable."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        tokens = torch.randint(10, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        tokens.insert(int(torch.randint(0, len(tokens), (1,), generator=g)), 5 + i % 3)
        out.append({"input_ids": [1] + tokens, "labels": i % 3})
    return out


def gen_data(n=24, seed=2):
    """Copy task: prompt a b c <sep=3> then a b c <eos=2>; varying lengths (token normalisation matters)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        body = torch.randint(10, 48, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        prompt = [1] + body + [3]
        out.append(
            {
                "input_ids": prompt + body + [2],
                "labels": [-100] * len(prompt) + body + [2],
                "prompt_ids": prompt,
                "reference": " ".join(map(str, body)),
            }
        )
    return out


def losses(result):
    return [h["loss"] for h in result.history]


def test_lr_schedule_matches_transformers():
    model = torch.nn.Linear(1, 1)
    for name, make in (
        ("cosine", transformers.get_cosine_schedule_with_warmup),
        ("linear", transformers.get_linear_schedule_with_warmup),
    ):
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = make(opt, num_warmup_steps=2, num_training_steps=6)
        for step in range(6):
            assert lr_factor(step, 6, 2, name) == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
            opt.step()
            sched.step()
    assert lr_factor(0, 6, 2, "cosine") == 0.0  # the first update uses lr 0 during warmup
    assert lr_factor(3, 6, 0, "constant") == 1.0


def test_accumulation_is_normalised_by_target_count():
    """batch 8 x 1 and batch 4 x 2 see the same examples: same loss and same gradient norm."""
    data = gen_data(16)
    runs = []
    for batch_size, accum in ((8, 1), (4, 2), (2, 4)):
        model = tiny_llama()
        runs.append(
            train(
                model,
                data,
                None,
                TrainConfig(
                    task="generation",
                    batch_size=batch_size,
                    grad_accum=accum,
                    max_steps=1,
                    progress=False,
                    max_grad_norm=0,
                ),
            )
        )
    for other in runs[1:]:
        assert other.history[0]["targets"] == runs[0].history[0]["targets"]
        assert other.history[0]["loss"] == pytest.approx(runs[0].history[0]["loss"], rel=1e-6)
        assert other.history[0]["grad_norm"] == pytest.approx(runs[0].history[0]["grad_norm"], rel=1e-5)


def test_loss_decreases_on_a_learnable_task():
    model = tiny_llama()
    result = train(
        model,
        gen_data(48),
        None,
        TrainConfig(task="generation", batch_size=8, lr=1e-2, max_steps=40, warmup_steps=2, progress=False),
    )
    first, last = losses(result)[:5], losses(result)[-5:]
    assert sum(last) / 5 < 0.75 * sum(first) / 5, (first, last)


class Crash(Exception):
    pass


def _crash_at(step):
    def on_step(entry):
        if entry["step"] == step:
            raise Crash

    return on_step


def test_resume_after_a_crash_reproduces_losses_bit_for_bit(tmp_path):
    """QLoRA (NF4 base, LoRA dropout, BERT dropout: RNG matters), accumulation, warmup + cosine, eval."""
    data, held_out = cls_data(30), cls_data(9, seed=5)
    config = dict(
        task="classification",
        batch_size=4,
        grad_accum=2,
        lr=5e-3,
        warmup_steps=2,
        max_steps=9,
        eval_every=3,
        save_every=2,
        keep_last=2,
        optimizer="paged_adamw",
        progress=False,
        seed=3,
    )
    reference = train(qlora_bert(), data, held_out, TrainConfig(**config, output_dir=str(tmp_path / "a")))

    with pytest.raises(Crash):  # killed in the middle of step 5 (after step 4's checkpoint)
        train(qlora_bert(), data, held_out, TrainConfig(**config, output_dir=str(tmp_path / "b")), on_step=_crash_at(5))
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-000002", "step-000004"]
    (tmp_path / "b" / "checkpoints" / ".tmp-step-000006-999").mkdir()  # a checkpoint write killed half-way
    resumed = train(qlora_bert(), data, held_out, TrainConfig(**config, output_dir=str(tmp_path / "b"), resume=True))
    assert losses(resumed) == losses(reference)  # exact equality, not approx
    assert [h["grad_norm"] for h in resumed.history] == [h["grad_norm"] for h in reference.history]
    assert resumed.evals == reference.evals
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-000008", "step-000009"]
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-000009" / "state.json").read_text())
    assert state["step"] == 9 and "torch" in state["rng"]


def test_eval_data_is_evaluated_at_the_end_by_default(tmp_path):
    data, held_out = cls_data(8), cls_data(6, seed=5)
    config = TrainConfig(batch_size=4, max_steps=3, progress=False, output_dir=str(tmp_path))
    result = train(qlora_bert(), data, held_out, config)
    assert [e["step"] for e in result.evals] == [3] and "accuracy" in result.evals[0]
    assert len((tmp_path / "evals.jsonl").read_text().splitlines()) == 1
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3  # appended step by step
    # checkpoints without save_every: each epoch's end (2 micro-batches per epoch: step 2) and the last step
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000002", "step-000003"]


def test_resume_refuses_another_model_or_run(tmp_path):
    data = cls_data(12)
    config = dict(
        task="classification", batch_size=4, max_steps=2, save_every=1, progress=False, output_dir=str(tmp_path)
    )
    train(qlora_bert(), data, None, TrainConfig(**config))
    other = prepare_model(tiny_bert(), r=8, alpha=8, modules_to_save=["classifier"])  # rank 8, not 4
    with pytest.raises(CheckpointError, match="written for another model"):
        train(other, data, None, TrainConfig(**config, resume=True))
    with pytest.raises(CheckpointError, match="from a run of 2 steps"):
        train(qlora_bert(), data, None, TrainConfig(**{**config, "max_steps": 5}, resume=True))
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        train(qlora_bert(), data, None, TrainConfig(**{**config, "output_dir": str(tmp_path / "empty")}, resume=True))


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("lr", 0.0, "0 < lr < 1"),
        ("batch_size", 0, "integer >= 1"),
        ("schedule", "step", "one of"),
        ("max_grad_norm", -1.0, ">= 0"),
        ("early_stopping_patience", 2, "needs periodic evaluation"),
        ("save_every", 5, "unless output_dir is set"),
        ("keep_last", 0, ">= 1"),
        ("epochs", math.inf, "finite"),
    ],
)
def test_config_out_of_range(field, value, expected):
    with pytest.raises(ConfigError, match=f"{field}={value!r} is out of range.*{expected}"):
        TrainConfig(**{field: value}).validate()


def test_empty_or_frozen_inputs_are_refused():
    with pytest.raises(ConfigError, match="train_data is empty"):
        train(tiny_bert(), [], None, TrainConfig(progress=False))
    model = tiny_bert()
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train(model, cls_data(4), None, TrainConfig(progress=False, max_steps=1))


def test_gradient_checkpointing_with_frozen_inputs_matches_plain_run():
    data = gen_data(8)
    config = dict(task="generation", batch_size=4, max_steps=2, lr=1e-2, progress=False)
    runs = []
    for checkpointing in (False, True):
        model = prepare_model(tiny_llama(), r=4, alpha=8)  # embeddings frozen: checkpointed blocks get no grad input
        result = train(model, data, None, TrainConfig(**config, gradient_checkpointing=checkpointing))
        runs.append((losses(result), [h["grad_norm"] for h in result.history]))
    assert runs[1][1][0] > 0
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-4)


def test_early_stopping_stops_after_patience():
    # a threshold no evaluation can beat: the second evaluation is "no improvement", patience 1 stops there
    result = train(
        tiny_bert(),
        cls_data(16),
        cls_data(6, seed=9),
        TrainConfig(
            batch_size=4,
            max_steps=10,
            eval_every=1,
            early_stopping_patience=1,
            early_stopping_threshold=1e9,
            progress=False,
        ),
    )
    assert result.stopped_early and result.steps == 2 and len(result.evals) == 2


def test_delta_w_is_the_change_per_step_and_the_cumulative_change():
    """‖ΔW_t‖_F = ‖W_t − W_{t−1}‖_F (LoRA: of s·B·A) per step, and ‖W_t − W_0‖_F as a second series."""
    model = qlora_bert()
    query = "bert.encoder.layer.0.attention.self.query"
    module = model.get_submodule(query)
    assert isinstance(module, LoRALinear)
    updates = []  # s·B·A after each step
    config = TrainConfig(batch_size=4, max_steps=3, lr=1e-2, progress=False)
    result = train(model, cls_data(8), None, config, on_step=lambda e: updates.append(module.delta_weight().double()))
    per_step = [h["delta_w"][query] for h in result.history]
    assert per_step[0] == pytest.approx(float(updates[0].norm()), rel=1e-6)  # B_0 = 0
    for t in (1, 2):
        assert per_step[t] == pytest.approx(float((updates[t] - updates[t - 1]).norm()), rel=1e-6)
    assert per_step[2] < 0.9 * float(updates[2].norm())  # not the cumulative distance
    first = result.history[0]
    assert first["delta_w_cumulative"] == pytest.approx(first["delta_w_total"], rel=1e-9)  # W_0 = W_{t-1} at t = 1
    for h in result.history:
        assert h["delta_w_total"] == pytest.approx(math.sqrt(sum(v * v for v in h["delta_w"].values())))

    dense = tiny_bert()
    tracker = DeltaTracker(dense)
    name = "bert.encoder.layer.1.output.dense.weight"
    for times in (1, 2):
        with torch.no_grad():
            dense.get_parameter(name).add_(1.0)
        step, cumulative = tracker.norms()
        root_n = math.sqrt(dense.get_parameter(name).numel())
        assert step[name] == pytest.approx(root_n, rel=1e-6)
        assert cumulative[name] == pytest.approx(times * root_n, rel=1e-6)


def test_freezing_policies_discriminative_lr_and_gradual_unfreezing():
    model = tiny_bert(dropout=0.0)
    freeze.full(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = freeze.discriminative_lr_groups(model, 1e-2, decay=0.5, include_frozen=True)
    schedule = freeze.GradualUnfreezing.top_down(model, every=2)
    result = train(
        model,
        cls_data(16),
        None,
        TrainConfig(batch_size=4, max_steps=3, lr=1e-2, progress=False),
        param_groups=groups,
        unfreeze=schedule,
    )
    assert result.steps == 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, initial[n])}
    assert "classifier.weight" in changed  # stage 0: the head
    assert any(n.startswith("bert.encoder.layer.1.") for n in changed)  # stage 1 (step 2): the top layer
    assert not any(n.startswith("bert.encoder.layer.0.") for n in changed)  # not reached yet
    assert "bert.embeddings.word_embeddings.weight" not in changed


def test_paged_adamw_gives_the_same_losses_as_adamw_on_cpu():
    runs = [
        losses(
            train(
                qlora_bert(),
                cls_data(12),
                None,
                TrainConfig(batch_size=4, max_steps=4, lr=1e-2, optimizer=opt, progress=False),
            )
        )
        for opt in ("adamw", "paged_adamw")
    ]
    assert runs[0] == runs[1]
