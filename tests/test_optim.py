"""FusedMADGRAD equals the madgrad package's MADGRAD update, skips on the device, and schedules on it;
StackedMADGRAD updates several models in one pass, each as its own FusedMADGRAD."""

from __future__ import annotations

import copy

import pytest
import torch
from madgrad import MADGRAD

from t2l_fast.optim import FusedMADGRAD, StackedMADGRAD, madgrad_lr


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3),
        torch.nn.BatchNorm2d(5),
        torch.nn.ReLU(),
        torch.nn.Conv2d(5, 2, 1),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 5 * 7, 3),
    )


def _grads(model: torch.nn.Module, step: int) -> None:
    """A different gradient each step: a fresh input and a step-dependent loss."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 3, 7, 9, generator=g)
    out = model(x)
    target = torch.randn(out.shape, generator=g)
    ((out - target) ** 2 * (1 + step % 3)).mean().backward()


def _same_grads(ref_model: torch.nn.Module, fused_model: torch.nn.Module, step: int) -> None:
    """The reference model's gradient at this step, copied to the fused model: both optimizers see
    the same varying gradients, so the comparison measures the optimizers, not a chaotic feedback of
    rounding through the model."""
    _grads(ref_model, step)
    for pr, pf in zip(ref_model.parameters(), fused_model.parameters(), strict=True):
        pf.grad = None if pr.grad is None else pr.grad.clone()


def _check_equal(a: torch.nn.Module, b: torch.nn.Module, start: list[torch.Tensor]) -> None:
    """Per tensor: the displacement from the start agrees to 1e-5 relative (fp32 rounding gives ~3e-7)."""
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), start, strict=True):
        da, db = (pa - p0).detach(), (pb - p0).detach()
        err = float((db - da).norm() / da.norm().clamp_min(1e-12))
        assert err < 1e-5, (name, err)
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-6, msg=name)


CASES = [
    dict(lr=1e-2, momentum=0.9, weight_decay=0.01),
    dict(lr=2.5e-3, momentum=0.9, weight_decay=0.0),
    dict(lr=1e-2, momentum=0.0, weight_decay=0.01),
    dict(lr=1e-2, momentum=0.5, weight_decay=0.05, decouple_decay=True),
    dict(lr=1e-2, momentum=0.9, weight_decay=0.01, eps=1e-4),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_equals_madgrad_package_over_20_steps(kw):
    ref_model = _model()
    fused_model = copy.deepcopy(ref_model)
    start = [p.detach().clone() for p in ref_model.parameters()]
    ref = MADGRAD(ref_model.parameters(), **kw)
    fused = FusedMADGRAD(fused_model.parameters(), **kw)
    for step in range(20):
        ref.zero_grad(set_to_none=True)
        _same_grads(ref_model, fused_model, step)
        ref.step()
        applied = fused.step()
        assert bool(applied)
        _check_equal(ref_model, fused_model, start)
    # The state too, not only the parameters.
    for p_ref, p_fused in zip(ref_model.parameters(), fused_model.parameters(), strict=True):
        torch.testing.assert_close(
            fused.state[p_fused]["grad_sum_sq"], ref.state[p_ref]["grad_sum_sq"], rtol=1e-5, atol=0
        )
        s_ref = ref.state[p_ref]["s"]  # a signed sum: compared as a whole, like the displacement
        assert float((fused.state[p_fused]["s"] - s_ref).norm() / s_ref.norm()) < 1e-5
    assert float(fused.updates) == 20 and int(ref.state["k"]) == 20


def test_schedule_equals_package_with_the_lr_set_by_hand():
    """lr = max(lr0 * gamma^k, min_lr) with k the applied updates, against the package stepping
    its group lr by hand; gamma and the floor both matter within 20 steps."""
    lr0, gamma, min_lr = 1e-2, 0.8, 1e-3
    ref_model = _model()
    fused_model = copy.deepcopy(ref_model)
    ref = MADGRAD(ref_model.parameters(), lr=lr0, momentum=0.9, weight_decay=0.01)
    fused = FusedMADGRAD(
        fused_model.parameters(), lr=lr0, momentum=0.9, weight_decay=0.01, gamma=gamma, min_lr=min_lr
    )
    assert madgrad_lr(lr0, gamma, min_lr, 19) == min_lr  # the floor is reached
    start = [p.detach().clone() for p in ref_model.parameters()]
    for step in range(20):
        ref.zero_grad(set_to_none=True)
        _same_grads(ref_model, fused_model, step)
        for group in ref.param_groups:
            group["lr"] = madgrad_lr(lr0, gamma, min_lr, step)
        torch.testing.assert_close(
            float(fused.scheduled_lr()), madgrad_lr(lr0, gamma, min_lr, step), rtol=1e-12, atol=0
        )
        ref.step()
        fused.step()
        _check_equal(ref_model, fused_model, start)


def test_skip_is_a_no_op_and_does_not_advance_the_schedule():
    """Skipped steps (a device flag, or a NaN/inf gradient) change nothing: parameters, state, step
    count; the real updates around them equal the package's run without the skipped steps."""
    lr0, gamma = 1e-2, 0.7
    ref_model = _model()
    fused_model = copy.deepcopy(ref_model)
    ref = MADGRAD(ref_model.parameters(), lr=lr0, momentum=0.9, weight_decay=0.01)
    fused = FusedMADGRAD(fused_model.parameters(), lr=lr0, momentum=0.9, weight_decay=0.01, gamma=gamma)
    start = [p.detach().clone() for p in ref_model.parameters()]
    real = 0
    skipped = {2: "flag", 3: "nan", 5: "inf", 6: "flag"}
    for step in range(12):
        ref.zero_grad(set_to_none=True)
        _same_grads(ref_model, fused_model, step)
        how = skipped.get(step)
        if how == "nan":
            next(fused_model.parameters()).grad[0].fill_(float("nan"))
        if how == "inf":
            list(fused_model.parameters())[-1].grad[0] = float("inf")
        before = [p.detach().clone() for p in fused_model.parameters()]
        state_before = (
            {k: v.clone() for k, v in fused._flat[id(fused.param_groups[0])].items() if torch.is_tensor(v)}
            if step
            else {}
        )
        applied = fused.step(skip=torch.tensor(how == "flag"))
        assert applied.dtype == torch.bool and applied.dim() == 0
        if how:
            assert not bool(applied)
            for b, p in zip(before, fused_model.parameters(), strict=True):
                assert torch.equal(b, p.detach())
            for key, v in state_before.items():
                assert torch.equal(v, fused._flat[id(fused.param_groups[0])][key]), key
            assert float(fused.updates) == real
            continue
        assert bool(applied)
        for group in ref.param_groups:
            group["lr"] = madgrad_lr(lr0, gamma, 0.0, real)
        ref.step()
        real += 1
        _check_equal(ref_model, fused_model, start)
    assert real == 8 and float(fused.updates) == real


def test_parameters_without_gradient_are_left_alone():
    ref_model = _model()
    fused_model = copy.deepcopy(ref_model)
    ref = MADGRAD(ref_model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.01)
    fused = FusedMADGRAD(fused_model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.01)
    start = [p.detach().clone() for p in ref_model.parameters()]
    for step in range(6):
        ref.zero_grad(set_to_none=True)
        _grads(ref_model, step)
        if step % 2:
            ref_model[0].weight.grad = None  # this tensor sits out every other step
        for pr, pf in zip(ref_model.parameters(), fused_model.parameters(), strict=True):
            pf.grad = None if pr.grad is None else pr.grad.clone()
        ref.step()
        fused.step()
        _check_equal(ref_model, fused_model, start)


def test_no_host_sync_in_step(monkeypatch):
    """The step reads nothing back to the host (Tensor.item/tolist/__bool__/... are not called)."""
    model = _model()
    opt = FusedMADGRAD(model.parameters(), lr=1e-2, gamma=0.9, min_lr=1e-4)
    _grads(model, 0)
    opt.step()  # state initialisation
    opt.zero_grad()
    _grads(model, 1)
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "nonzero"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    opt.step(skip=torch.tensor(False))
    monkeypatch.undo()
    assert calls == []


def test_invalid_arguments():
    w = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="momentum"):
        FusedMADGRAD(w, momentum=1.0)
    with pytest.raises(ValueError, match="eps"):
        FusedMADGRAD(w, eps=0.0)
    with pytest.raises(ValueError, match="closure"):
        FusedMADGRAD(w).step(lambda: 0.0)


@pytest.mark.parametrize("kw", CASES[:4], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_stacked_models_each_equal_their_own_optimizer(kw):
    """Three models in one StackedMADGRAD, six steps with the gradients of different inputs: model 1
    is told to skip at step 2, model 2's gradient is NaN at step 4 (it skips alone); each model
    ends where its own FusedMADGRAD takes it, and the schedule follows each one's applied updates."""
    kw = dict(kw, gamma=0.9, min_lr=1e-3)
    models = []
    for k in range(3):
        torch.manual_seed(k)
        models.append(
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 1))
        )
    lone = [copy.deepcopy(m) for m in models]
    stacked = StackedMADGRAD([m.parameters() for m in models], **kw)
    opts = [FusedMADGRAD(m.parameters(), **kw) for m in lone]
    for step in range(6):
        for k, (m, ref) in enumerate(zip(models, lone, strict=True)):
            x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(10 * step + k))
            ref(x).square().mean().mul(1 + k).backward()
            for p, q in zip(m.parameters(), ref.parameters(), strict=True):
                p.grad = q.grad.clone()
                if k == 2 and step == 4:
                    p.grad[..., 0] = float("nan")
        skip = torch.tensor([False, step == 2, False])
        applied = stacked.step(skip=skip)
        want = [opts[k].step(skip=skip[k]) for k in range(2)] + [opts[2].step(skip=torch.tensor(step == 4))]
        assert applied.shape == (3,) and applied.tolist() == [bool(w) for w in want]
        for m, opt in zip(models, opts, strict=True):
            m.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
    assert stacked.updates.tolist() == [6.0, 5.0, 5.0]
    torch.testing.assert_close(stacked.scheduled_lr(), torch.stack([o.scheduled_lr() for o in opts]))
    for m, ref in zip(models, lone, strict=True):
        for p, q in zip(m.parameters(), ref.parameters(), strict=True):
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    assert not torch.equal(models[0][0].weight, models[1][0].weight)


def test_stacked_models_need_one_structure_and_every_gradient():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 3)
    with pytest.raises(ValueError, match="same parameter shapes"):
        StackedMADGRAD([a.parameters(), b.parameters()])
    c = torch.nn.Linear(3, 2)
    opt = StackedMADGRAD([a.parameters(), c.parameters()])
    a(torch.ones(1, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="every parameter needs a gradient"):
        opt.step()
