"""PagedAdamW: bit-identity with torch.optim.AdamW, resume through safetensors, paging on CUDA."""

import copy

import pytest
import torch
from torch import nn

from lowrank.optim import (
    OptimizerStateError,
    PagedAdamW,
    load_optimizer_state,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_optimizer_state,
)


def _model(device="cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).to(device)
    model[2].requires_grad_(False)  # a frozen layer in the middle
    return model


def _train(model, optimizer, steps, accumulation=3, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _ in range(accumulation):
            x = torch.randn(5, 8, generator=gen).to(device)
            loss = model(x).pow(2).mean() / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=1e-2),
        dict(lr=3e-3, weight_decay=0.1, amsgrad=True),
        dict(lr=1e-3, betas=(0.8, 0.95), eps=1e-6, maximize=True),
    ],
)
def test_bit_identical_to_torch_adamw(kwargs):
    ours, ref = _model(), _model()
    opt = PagedAdamW(ours.parameters(), **kwargs)
    ref_opt = torch.optim.AdamW(ref.parameters(), **kwargs)
    _train(ours, opt, steps=25)
    _train(ref, ref_opt, steps=25)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b), name
    frozen = ours[2].weight
    assert frozen not in opt.state and frozen.grad is None
    assert torch.equal(frozen, _model()[2].weight)
    for p, state in ref_opt.state.items():
        mine = opt.state[dict(zip(map(id, ref.parameters()), ours.parameters(), strict=True))[id(p)]]
        assert set(mine) == set(state)
        for key in state:
            assert torch.equal(mine[key], state[key]), key
    assert opt.device_bytes_saved() == 0  # nothing is paged on CPU


def test_param_groups_and_late_unfreezing_match_adamw():
    ours, ref = _model(), _model()

    def groups(m):
        return [
            {"params": m[0].parameters(), "lr": 1e-2},
            {"params": [*m[2].parameters(), *m[4].parameters()], "lr": 1e-3},
        ]

    opt, ref_opt = PagedAdamW(groups(ours)), torch.optim.AdamW(groups(ref))
    _train(ours, opt, 4)
    _train(ref, ref_opt, 4)
    ours[2].requires_grad_(True)
    ref[2].requires_grad_(True)
    _train(ours, opt, 4, seed=2)
    _train(ref, ref_opt, 4, seed=2)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_through_safetensors_is_bit_identical(tmp_path):
    straight = _model()
    opt = PagedAdamW(straight.parameters(), lr=1e-2, weight_decay=0.05, amsgrad=True)
    _train(straight, opt, 6)
    _train(straight, opt, 6, seed=7)

    first = _model()
    opt1 = PagedAdamW(first.parameters(), lr=1e-2, weight_decay=0.05, amsgrad=True)
    _train(first, opt1, 6)
    save_optimizer_state(opt1, tmp_path / "optimizer.safetensors")
    resumed = copy.deepcopy(first)
    opt2 = PagedAdamW(resumed.parameters(), lr=0.5, weight_decay=0.0, amsgrad=True)  # overwritten by the load
    load_optimizer_state(opt2, tmp_path / "optimizer.safetensors")
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    _train(resumed, opt2, 6, seed=7)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".tmp-*"))


def test_torch_adamw_state_loads_into_paged_adamw():
    ref = _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _train(ref, ref_opt, 3)
    ours = copy.deepcopy(ref)
    opt = PagedAdamW(ours.parameters(), lr=1e-2)
    tensors, meta = optimizer_state_to_tensors(ref_opt)
    optimizer_state_from_tensors(opt, tensors, meta)
    _train(ref, ref_opt, 3, seed=3)
    _train(ours, opt, 3, seed=3)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_optimizer_state_files(tmp_path):
    model = _model()
    opt = PagedAdamW(model.parameters())
    _train(model, opt, 1)
    path = tmp_path / "opt.safetensors"
    save_optimizer_state(opt, path)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OptimizerStateError, match="not a readable safetensors"):
        load_optimizer_state(opt, tmp_path / "truncated.safetensors")
    with pytest.raises(OptimizerStateError, match="does not exist"):
        load_optimizer_state(opt, tmp_path / "missing.safetensors")
    other = PagedAdamW([nn.Parameter(torch.zeros(3))])
    with pytest.raises(OptimizerStateError, match="parameters"):
        load_optimizer_state(other, path)
    tensors, meta = optimizer_state_to_tensors(opt)
    assert tensors["state.0.exp_avg"].shape == model[0].weight.shape
    with pytest.raises(OptimizerStateError, match="shape"):
        optimizer_state_from_tensors(opt, {**tensors, "state.0.exp_avg": torch.zeros(2, 2, 2)}, meta)
    with pytest.raises(OptimizerStateError, match="unexpected tensor key"):
        optimizer_state_from_tensors(opt, {**tensors, "bogus": torch.zeros(1)}, meta)


class _PagedOnCPU(PagedAdamW):
    """Pages CPU parameters too (synchronous copies): exercises the paging bookkeeping without a GPU."""

    def wants_paging(self, p):
        return self.paged and p.numel() >= self.page_min_numel


def test_paging_bookkeeping_is_bit_identical_and_resumes(tmp_path):
    ours, ref = _model(), _model()
    opt = _PagedOnCPU(ours.parameters(), lr=1e-2, amsgrad=True, page_min_numel=100)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, amsgrad=True)
    _train(ours, opt, 5)
    _train(ref, ref_opt, 5)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    paged = [p for p in ours.parameters() if p in opt.state and p.numel() >= 100]
    assert paged and opt.device_bytes_saved() == sum(3 * 4 * p.numel() for p in paged)
    save_optimizer_state(opt, tmp_path / "o.safetensors")
    resumed = copy.deepcopy(ours)
    opt2 = _PagedOnCPU(resumed.parameters(), lr=1e-2, amsgrad=True, page_min_numel=100)
    load_optimizer_state(opt2, tmp_path / "o.safetensors")
    assert opt2.device_bytes_saved() == opt.device_bytes_saved()
    _train(resumed, opt2, 5, seed=4)
    _train(ref, ref_opt, 5, seed=4)
    for a, b in zip(resumed.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8), dict(weight_decay=-0.1), dict(page_min_numel=-1)]
)
def test_rejects_bad_hyper_parameters(bad):
    with pytest.raises(ValueError):
        PagedAdamW([nn.Parameter(torch.zeros(2))], **bad)


@pytest.mark.gpu
def test_cuda_paging_is_bit_identical_and_saves_device_memory(tmp_path):
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 8)).cuda()
    big[2].requires_grad_(False)
    ref = copy.deepcopy(big)
    opt = PagedAdamW(big.parameters(), lr=1e-3, weight_decay=0.01, page_min_numel=100_000)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    _train(big, opt, 10, device="cuda")
    _train(ref, ref_opt, 10, device="cuda")
    for a, b in zip(big.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    state = opt.state[big[0].weight]
    assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].is_pinned()
    assert opt.state[big[0].bias]["exp_avg"].device.type == "cuda"  # small: stays on the device
    assert opt.device_bytes_saved() == 2 * 4 * big[0].weight.numel()
    save_optimizer_state(opt, tmp_path / "o.safetensors")
    opt2 = PagedAdamW(big.parameters(), lr=1e-3, weight_decay=0.01)
    load_optimizer_state(opt2, tmp_path / "o.safetensors")
    assert opt2.state[big[0].weight]["exp_avg"].is_pinned()
    assert torch.equal(opt2.state[big[0].weight]["exp_avg_sq"], state["exp_avg_sq"])
