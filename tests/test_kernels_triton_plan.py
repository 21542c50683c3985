"""The Triton plan's own bookkeeping (ftsam_plugin.kernels.triton_plan): ticket counter, layout rule.

Kernels run in Triton's interpreter (TRITON_INTERPRET=1 from conftest) on small CPU tensors.
"""

import pytest
import torch

from ftsam_plugin import kernels
from ftsam_plugin.kernels import plan_guard
from ftsam_plugin.kernels import sam_triton
from test_kernels_sam import make_params
from test_kernels_sam import oracle_e
from test_kernels_sam import oracle_norm


def channels_last_1x1(shape=(8, 4, 1, 1)):
    """A tensor with the strides cuDNN gives a 1x1 conv's grad on channels_last input: (C, 1, C, C)."""
    n, c = shape[:2]
    return torch.empty_strided(shape, (c, 1, c, c)).copy_(torch.randn(shape))


def two_group_params():
    """fp32 + bf16 params: a plan with two launches per norm, sharing one ticket counter."""
    return make_params([(300,), (5, 7)]) + make_params([(200,), (3, 3)], torch.bfloat16)


def interrupt_launch(monkeypatch, kind, n):
    """Make the n-th launch of kernel `kind` (1-based) raise KeyboardInterrupt, as Ctrl-C between two launches."""
    real, seen = sam_triton.Launch.__call__, []

    def launch(self, *values):
        if self.kernel is sam_triton.KERNELS[kind]:
            seen.append(kind)
            if len(seen) == n:
                raise KeyboardInterrupt
        real(self, *values)

    monkeypatch.setattr(sam_triton.Launch, "__call__", launch)


def test_norm_after_an_interrupted_multi_launch_norm_is_right(monkeypatch):
    ps = two_group_params()
    plan = kernels.create_plan(ps, adaptive=True, backend="triton")
    assert len(plan._groups) == 2
    with monkeypatch.context() as m:
        interrupt_launch(m, "sumsq", 2)  # the first group's programs took their tickets; the second never ran
        with pytest.raises(KeyboardInterrupt):
            plan.grad_norm()
    for _ in range(3):  # every later norm of this plan, not only the next one, each on new grads
        for p in ps:
            p.grad.copy_(torch.randn(p.shape).to(p.grad.dtype))
        torch.testing.assert_close(plan.grad_norm().double(), oracle_norm(ps, adaptive=True), rtol=5e-6, atol=0)


def test_strides_of_size_one_dims_do_not_matter():
    # cuDNN gives a contiguous 1x1-conv weight a channels_last-strided grad on channels_last input: same memory
    # order (strides differ only where the size is 1), so the kernels take it, as PyTorch's layout rule does
    p = torch.randn(8, 4, 1, 1).requires_grad_()
    p.grad = channels_last_1x1()
    assert p.grad.stride() != p.stride()
    ps = [p] + make_params([(5,)])
    plan = kernels.create_plan(ps, adaptive=True, backend="triton")
    norm = plan.grad_norm()
    torch.testing.assert_close(norm.double(), oracle_norm(ps, adaptive=True), rtol=1e-6, atol=0)
    before = [q.detach().clone() for q in ps]
    plan.perturb(norm, 0.5)
    for q, b in zip(ps, before):
        r = b.clone()
        r.grad = q.grad
        torch.testing.assert_close(q.detach().double() - b.double(), oracle_e(r, norm.double(), 0.5, True),
                                   rtol=4e-6, atol=1e-6)
    plan.restore()
    assert all(torch.equal(q.detach(), b) for q, b in zip(ps, before))
    for impl in plan_guard.IMPLS[1:]:
        guard = plan_guard.create_guard(ps, plan.grad_alignment(), impl)
        p.grad = torch.randn(8, 4, 1, 1)  # moved, contiguous again: still the same layout, re-pointed
        assert guard.check() == (plan_guard.MOVED, -1)


def test_auto_keeps_triton_for_size_one_stride_differences(monkeypatch):
    import warnings

    monkeypatch.setattr(kernels, "AUTO_TRITON_DEVICES", ("cpu",))  # as on CUDA: auto picks Triton
    monkeypatch.setattr(kernels, "_warned_fallback", [])
    p = torch.randn(8, 4, 1, 1).requires_grad_()
    p.grad = channels_last_1x1()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to foreach
        plan = kernels.create_plan([p], backend="auto")
    assert type(plan).__name__ == "TritonPlan"
    p2 = torch.randn(4, 6).requires_grad_()
    p2.grad = torch.randn(6, 4).t()  # a real layout difference (sizes > 1) is still refused
    with pytest.raises(ValueError, match="grad shape/strides"):
        kernels.create_plan([p2], backend="triton")


@pytest.mark.parametrize("impl", plan_guard.IMPLS[1:])
def test_moved_grads_are_re_pointed_in_every_group(impl):
    # two groups and an empty param (in no group): the guard's addresses land in each group's own table rows
    ps = two_group_params() + make_params([(0,)])
    plan = kernels.create_plan(ps, adaptive=True, backend="triton")
    guard = plan_guard.create_guard(ps, plan.grad_alignment(), impl)
    old = [p.grad for p in ps]
    for p in ps:
        p.grad = torch.randn(p.shape).to(p.dtype)  # new storage, new values
    assert guard.check() == (plan_guard.MOVED, -1)
    plan.point_grads(guard.grad_ptrs())
    for g in old:
        g.fill_(1e4)  # the plan must not read these any more
    torch.testing.assert_close(plan.grad_norm().double(), oracle_norm(ps, adaptive=True), rtol=5e-6, atol=0)
