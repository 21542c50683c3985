"""Cheaper SAM schedules (ftsam_plugin.optim.SamSchedule): the rule, plain steps, state_dict/resume, AMP."""

import copy

import pytest
import torch
from torch import nn

from ftsam_plugin.optim import SAM, SamSchedule, freeze_bn
from ftsam_plugin.optim.schedule import step_uniform

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def make_sam(model, schedule=None):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=LR, momentum=MOMENTUM,
               weight_decay=WD, schedule=schedule)


# ---- reference: FT-SAM's step before schedules existed (first_step + second_step on every step) ----
def reference_step(model, opt, x, y, scaler=None):
    scale = (lambda t: scaler.scale(t)) if scaler is not None else (lambda t: t)
    scale(loss_of(model, x, y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    with freeze_bn(model):
        scale(loss_of(model, x, y)).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)


# ---- independent reference: an FT-SAM step written out without the SAM class ----
def hand_ftsam_step(model, sgd, loss, x, y, rho):
    """ASAM with eta 0: e = rho * w^2 * g / || |w| * g ||, computed in fp64 from the formula; the second pass's
    BatchNorm statistics put back by hand; `sgd` (a torch.optim.SGD on the params) steps with the grad at w + e."""
    params = list(model.parameters())
    sgd.zero_grad(set_to_none=True)
    loss(model, x, y).backward()
    with torch.no_grad():
        tg = [p.double().abs() * p.grad.double() for p in params]
        norm = torch.sqrt(sum((t * t).sum() for t in tg))
        olds = [p.detach().clone() for p in params]
        for p, t in zip(params, tg):
            p.add_((rho * p.double().abs() * t / (norm + 1e-12)).to(p.dtype))
    sgd.zero_grad(set_to_none=True)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    loss(model, x, y).backward()
    model.load_state_dict(stats, strict=False)
    with torch.no_grad():
        for p, w in zip(params, olds):
            p.copy_(w)
    sgd.step()


def assert_close_weights(a, b):
    for (key, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def scheduled_step(model, opt, x, y, scaler=None):
    """The schedule-aware step (what FTSAM.train_step does): SAM when due, else one pass and plain_step."""
    if opt.sam_step_due():
        return reference_step(model, opt, x, y, scaler)
    scale = (lambda t: scaler.scale(t)) if scaler is not None else (lambda t: t)
    scale(loss_of(model, x, y)).backward()
    opt.plain_step(zero_grad=True, grad_scaler=scaler)


def run(model, opt, steps, start=0, step=scheduled_step, epoch_of=lambda s: 1, scaler=None):
    for s in range(start, start + steps):
        opt.schedule.set_epoch(epoch_of(s))
        step(model, opt, *batch(s), scaler=scaler)


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def expected_sam_steps(steps, every=1, prob=1.0, seed=0, window=None, epoch_of=lambda s: 1):
    """The rule written out independently of SamSchedule.is_sam_step."""
    return [s for s in range(steps) if (window is None or window[0] <= epoch_of(s) <= window[1])
            and s % every == 0 and (prob == 1.0 or step_uniform(seed, s) < prob)]


@pytest.mark.parametrize("schedule", [None, SamSchedule(), SamSchedule(every=1, prob=1.0, epochs=None, seed=7)])
def test_every_step_rule_equals_plain_sam_bit_for_bit(schedule):
    a, b = tiny_model(), tiny_model()
    oa, ob = make_sam(a), make_sam(b, schedule)
    run(a, oa, 5, step=reference_step)
    run(b, ob, 5)
    assert same_weights(a, b)
    assert ob.schedule.always and ob.schedule.sam_steps == ob.schedule.step == 5
    # both sides above use the SAM class: the same steps computed without it agree up to rounding
    c = tiny_model()
    sgd = torch.optim.SGD(c.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for s in range(5):
        hand_ftsam_step(c, sgd, loss_of, *batch(s), rho=0.5)
    assert_close_weights(b, c)


@pytest.mark.parametrize("every,prob,window", [(2, 1.0, None), (3, 1.0, None), (1, 0.5, None), (2, 0.5, None),
                                               (1, 1.0, (2, 3)), (2, 0.7, (1, 2))])
def test_sam_steps_follow_the_rule(every, prob, window, monkeypatch):
    model = tiny_model()
    schedule = SamSchedule(every=every, prob=prob, epochs=window, seed=3)
    opt = make_sam(model, schedule)
    perturbed = []
    real_first = opt.first_step
    monkeypatch.setattr(opt, "first_step", lambda *a, **k: (perturbed.append(schedule.step), real_first(*a, **k)))
    epoch_of = lambda s: 1 + s // 4  # noqa: E731 (4 steps per epoch, 4 epochs)
    run(model, opt, 16, epoch_of=epoch_of)
    want = expected_sam_steps(16, every, prob, 3, window, epoch_of)
    assert perturbed == want and schedule.sam_steps == len(want) and schedule.step == 16


def test_probability_rule_is_seeded_and_near_its_rate():
    draws = {seed: [step_uniform(seed, s) < 0.5 for s in range(4000)] for seed in (0, 1)}
    assert draws[0] != draws[1]  # the seed matters
    assert draws[0] == [step_uniform(0, s) < 0.5 for s in range(4000)]  # and nothing else does
    for chosen in draws.values():
        assert abs(sum(chosen) / 4000 - 0.5) < 0.03
    assert all(0.0 <= step_uniform(5, s) < 1.0 for s in range(1000))


def test_no_sam_step_equals_the_base_optimizer_bit_for_bit():
    """Plain steps are FT's steps: a window the run never enters leaves SGD itself."""
    a, b = tiny_model(), tiny_model()
    opt = make_sam(a, SamSchedule(epochs=(5, 6)))
    sgd = torch.optim.SGD(b.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for s in range(4):
        opt.schedule.set_epoch(1)
        scheduled_step(a, opt, *batch(s))
        sgd.zero_grad()
        loss_of(b, *batch(s)).backward()
        sgd.step()
    assert same_weights(a, b) and opt.schedule.sam_steps == 0 and opt.schedule.step == 4


@pytest.mark.parametrize("every,prob,window", [(3, 1.0, None), (1, 0.5, None), (2, 0.6, (2, 3))])
def test_state_dict_resume_equals_uninterrupted(every, prob, window):
    epoch_of = lambda s: 1 + s // 3  # noqa: E731
    full = tiny_model()
    ofull = make_sam(full, SamSchedule(every, prob, window, seed=1))
    run(full, ofull, 10, epoch_of=epoch_of)
    part = tiny_model()
    opart = make_sam(part, SamSchedule(every, prob, window, seed=1))
    run(part, opart, 4, epoch_of=epoch_of)
    model_sd, opt_sd = copy.deepcopy(part.state_dict()), copy.deepcopy(opart.state_dict())
    assert opt_sd["sam_schedule"] == {"step": 4, "sam_steps": opart.schedule.sam_steps}
    resumed = tiny_model()
    resumed.load_state_dict(model_sd)
    oresumed = make_sam(resumed, SamSchedule(every, prob, window, seed=1))
    oresumed.load_state_dict(opt_sd)
    run(resumed, oresumed, 6, start=4, epoch_of=epoch_of)
    assert same_weights(full, resumed)
    assert oresumed.schedule.state_dict() == ofull.schedule.state_dict()


def test_older_state_without_counters_refused_only_when_steps_are_skipped():
    model = tiny_model()
    state = make_sam(model).state_dict()
    del state["sam_schedule"]
    make_sam(model).load_state_dict(state)  # plain SAM: nothing to continue
    with pytest.raises(ValueError, match="no SAM schedule counters"):
        make_sam(model, SamSchedule(every=2)).load_state_dict(state)


def test_closure_step_follows_the_schedule():
    a, b = tiny_model(), tiny_model()
    oa, ob = make_sam(a, SamSchedule(every=2)), make_sam(b, SamSchedule(every=2))
    calls = []
    for s in range(4):
        x, y = batch(s)
        loss_of(a, x, y).backward()
        oa.step(lambda: (calls.append(s), loss_of(a, x, y).backward()))
        oa.zero_grad()
        scheduled_step(b, ob, x, y)
    assert calls == [0, 2] and oa.schedule.sam_steps == 2
    for p, q in zip(a.parameters(), b.parameters()):  # (the closure's pass has BN statistics running)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every,prob", [(2, 1.0), (1, 0.5)])
def test_grad_scaler_with_a_schedule_equals_the_unscaled_run(every, prob):
    """AMP's GradScaler (power-of-two scale: exact) on both kinds of steps gives the unscaled run's weights."""
    a, b = tiny_model(), tiny_model()
    oa, ob = make_sam(a, SamSchedule(every, prob)), make_sam(b, SamSchedule(every, prob))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    run(a, oa, 6, scaler=scaler)
    run(b, ob, 6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert oa.schedule.state_dict() == ob.schedule.state_dict() and 0 < oa.schedule.sam_steps < 6


def test_grad_scaler_skips_a_non_finite_plain_step():
    model = tiny_model()
    opt = make_sam(model, SamSchedule(every=2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    run(model, opt, 1, scaler=scaler)  # step 0: SAM
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.schedule.set_epoch(1)
    assert not opt.sam_step_due()
    scaler.scale(loss_of(model, *batch(1))).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    opt.plain_step(zero_grad=True, grad_scaler=scaler)
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0))
    assert scaler.get_scale() == 2.0 ** 9 and opt.schedule.step == 2  # skipped, lowered, counted


def test_bad_schedules():
    for kw in (dict(every=0), dict(every=1.5), dict(every=True), dict(prob=0.0), dict(prob=1.5),
               dict(epochs=(3, 2)), dict(epochs=(0, 2))):
        with pytest.raises(ValueError):
            SamSchedule(**kw)
    with pytest.raises(ValueError, match="schedule must be a SamSchedule"):
        make_sam(tiny_model(), schedule="every 2")
    opt = make_sam(tiny_model(), SamSchedule(epochs=(1, 2)))
    with pytest.raises(ValueError, match="needs set_epoch"):
        opt.sam_step_due()
    with pytest.raises(ValueError, match="out of range"):
        opt.schedule.load_state_dict({"step": 2, "sam_steps": 3})
