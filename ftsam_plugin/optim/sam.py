"""SAM / ASAM as a `torch.optim.Optimizer` wrapping a base optimizer (the davda54/sam protocol)."""

import contextlib
import math

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from ftsam_plugin import kernels

from .gsam import gradient_decompose
from .path import PathAnchor
from .schedule import SamSchedule
from .step_plans import MOVED
from .step_plans import STALE
from .step_plans import StepPlans


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (adaptive=True: ASAM as in davda54/sam, eta=0 -> FT-SAM's formula).

    e = rho * T^2 * g / (||T * g||_2 + 1e-12), T = |w| + eta if adaptive else 1, the norm over every param with a
    grad in every group. first_step: w += e. second_step: restore w, then the base optimizer steps with the grad
    taken at w + e. The base optimizer shares `param_groups` (and `state`), so a scheduler on either works.

    Args:
        params: iterable of tensors or param-group dicts (groups may set their own rho/adaptive/eta).
        base_optimizer: optimizer class, e.g. torch.optim.SGD; built on the same groups with `**base_kwargs`.
        rho: perturbation radius (> 0). adaptive: ASAM scaling. eta: ASAM offset (>= 0).
        restore: "copy" (exact, default) or "subtract" (w -= e, the ASAM/BackdoorBench way).
        adaptive_weights_only: T = 1 for biases and norm layers (params with ndim <= 1), as official ASAM.
        backend: "auto" | "triton" | "foreach" | "loop", passed to ftsam_plugin.kernels.
        schedule: a `SamSchedule` choosing which steps are SAM steps (default: every step). Before each step ask
            `sam_step_due()`: True -> first_step + second_step; False -> one forward/backward (under DDP the normal,
            all-reducing one) and `plain_step`, the base optimizer's step. Its counters are in `state_dict`.
        perturbation: what a SAM step perturbs along (PERTURBATIONS): "gradient" (default; SAM/ASAM, two passes:
            first_step + second_step) or "path" (PAM, optim/path.py: towards theta0, the params at construction,
            radius rho absolute; one pass: perturb_path + second_step).
        path_rho: > 0: the steps the schedule makes plain are path steps of this radius instead (e.g. ASAM in epochs
            1-5, path-aware after); 0 (default): plain steps. Ask `step_kind()` before each step.
        alpha: GSAM's gradient decomposition (optim/gsam.py, BackdoorBench's `sam_alpha`): the base step uses
            h - alpha * (g's component orthogonal to h), g the grad at w, h the grad at w + e. 0 (default, FT-SAM's
            value) skips it; otherwise first_step keeps a copy of g (one more param-sized buffer) and second_step
            spends two norms and an inner product (plain torch, not fused). Under DDP, h is the all-reduced grad.

    rho is read from the param groups at every first_step: a schedule may set group["rho"] between steps
    (ftsam_plugin.defense.rho_schedule does) without rebuilding any plan.

    The kernel plans (ftsam_plugin.kernels.create_plan: for Triton the device pointer table, work list and one
    persistent `saved` buffer) are built at the first step and reused while every param and grad keeps its
    storage (checked each step in one pass by kernels/plan_guard.py: addresses, devices, dtypes, shapes and
    strides); grads that moved (set to None and reallocated elsewhere) are re-pointed with one small copy. `plan_builds` and `grad_moves` count both. A step with
    unchanged storage allocates nothing and, without a GradScaler, never syncs with the host.

    Usage (AMP + BN freeze; under DDP put the whole first pass, forward included, in `with model.no_sync():`
    so each worker perturbs with its local gradient and only the second backward all-reduces):

        opt = SAM(model.parameters(), torch.optim.SGD, rho=2.0, adaptive=True, lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda")                   # or pass grad_scaler=None without AMP
        for x, y in loader:
            with torch.autocast("cuda", dtype=torch.float16):
                scaler.scale(loss_fn(model(x), y)).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)  # unscales, one host sync: skip if inf/nan
            with freeze_bn(model), torch.autocast("cuda", dtype=torch.float16):
                scaler.scale(loss_fn(model(x), y)).backward()
            opt.second_step(zero_grad=True, grad_scaler=scaler)  # restore, scaler.step(base), scaler.update()

    With a scaler, do not call scaler.step/update yourself; a non-finite grad in either pass skips the update
    (params unchanged) and lowers the scale. Without a scaler nothing syncs with the host. bf16 autocast needs
    no scaler.

    DDP + GradScaler: the first-pass grads are rank-local (no_sync), so a non-finite norm may show up on one rank
    only. When torch.distributed is initialized, first_step all-reduces the skip flag (MAX) and feeds it to the
    scaler's found-inf record, so every rank skips the same steps and keeps the same scale (one extra small
    collective per step, AMP with a scaler only; the no-DDP path has none). Every rank must call first_step.
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, eta=0.0, restore="copy",
                 adaptive_weights_only=False, backend="auto", schedule=None, alpha=0.0, perturbation="gradient",
                 path_rho=0.0, **base_kwargs):
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {sorted(PERTURBATIONS)}, got {perturbation!r}")
        if not (math.isfinite(path_rho) and path_rho >= 0.0):
            raise ValueError(f"path_rho must be a finite number >= 0, got {path_rho}")
        if not rho > 0.0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha}")
        if eta < 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if restore not in kernels.RESTORE_MODES:
            raise ValueError(f"restore must be 'copy' or 'subtract', got {restore!r}")
        if backend not in kernels.BACKENDS:
            raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError("base_optimizer must be an optimizer class such as torch.optim.SGD")
        if schedule is not None and not isinstance(schedule, SamSchedule):
            raise ValueError(f"schedule must be a SamSchedule or None, got {type(schedule).__name__}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.restore, self.weights_only, self.backend, self.alpha = restore, adaptive_weights_only, backend, alpha
        self.schedule = schedule if schedule is not None else SamSchedule()
        self._first_grads = None  # alpha != 0: {param: its grad at w}, kept by first_step for second_step
        self._plans = None  # StepPlans, reused while valid
        self._perturbed = None  # the StepPlans whose perturbation second_step undoes
        self._skipped = False
        self.plan_builds = 0  # plans built (first step, storage moved)
        self.grad_moves = 0  # steps whose grads had moved, re-pointed without a rebuild
        self.perturbation, self.path_rho = perturbation, float(path_rho)
        uses_path = perturbation == "path" or self.path_rho > 0
        self.path = PathAnchor([p for g in self.param_groups for p in g["params"]], backend) if uses_path else None
        self.path_steps = 0  # path steps taken in place of plain ones (path_rho > 0)
        self._due = False  # whether the step under way is one the schedule chose (counted as a SAM step)

    def step_kind(self):
        """The coming step: "gradient" (first_step, second pass, second_step), "path" (perturb_path, one pass,
        second_step) or "plain" (one pass, plain_step)."""
        if self.schedule.is_sam_step():
            return self.perturbation
        return "path" if self.path_rho > 0 else "plain"

    def _current_plans(self):
        plans = self._plans
        state = STALE if plans is None else plans.refresh(self.param_groups)
        if state == STALE:
            plans = self._plans = StepPlans(self.param_groups, self.weights_only, self.restore, self.backend)
            self.plan_builds += 1
        self.grad_moves += state == MOVED
        return plans

    # no @torch.no_grad() on first_step/second_step: the plans need no autograd state (the torch backends set
    # it themselves), and entering it would add host time to every step
    def first_step(self, zero_grad=False, grad_scaler=None):
        """w += e (e from the current grads). With an enabled GradScaler: unscale, skip on non-finite grads."""
        self._skipped, self._perturbed, self._first_grads, self._due = False, None, None, True
        amp = grad_scaler is not None and grad_scaler.is_enabled()
        if amp:
            grad_scaler.unscale_(self)  # SAM counts as its own optimizer; scaler.step(base) handles pass two
        plans = self._current_plans()
        norm = plans.grad_norm()
        if amp:  # AMP only: the one host sync
            bad = ~torch.isfinite(norm) if norm is not None else torch.zeros((), dtype=torch.bool)
            if dist.is_available() and dist.is_initialized():
                bad = self._any_rank(bad, grad_scaler)
            self._skipped = bool(bad)
        if not self._skipped and norm is not None:
            if self.alpha != 0:
                self._first_grads = {p: p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                                     if p.grad is not None}
            plans.perturb(norm, self.param_groups)
            self._perturbed = plans
        if zero_grad:
            self.zero_grad()

    def perturb_path(self, zero_grad=False):
        """w += rho * (theta0 - w) / ||theta0 - w|| (needs no grads): before the step's one forward/backward, which
        second_step then restores from and steps with. rho: each group's on the schedule's steps (perturbation
        "path"), path_rho on the others."""
        if self.path is None:
            raise ValueError("perturb_path needs perturbation='path' or path_rho > 0")
        self._skipped, self._first_grads = False, None
        self._due = self.schedule.is_sam_step()
        rhos = [g["rho"] if self._due else self.path_rho for g in self.param_groups]
        self.path.perturb(rhos, [len(g["params"]) for g in self.param_groups])
        self._perturbed = self.path
        if zero_grad:
            self.zero_grad()

    def _any_rank(self, bad, grad_scaler):
        """DDP: skip on every rank if any rank's local first-pass norm is non-finite, and make every rank's
        GradScaler see that inf (as FSDP's ShardedGradScaler does), so the scales stay equal across ranks."""
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        flag = bad.to(device=device, dtype=torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        found = grad_scaler._per_optimizer_states[id(self)]["found_inf_per_device"]  # set by unscale_(self)
        for value in found.values():
            value.copy_(torch.maximum(value, flag.to(value.device, value.dtype).reshape(value.shape)))
        return flag[0] > 0

    def second_step(self, zero_grad=False, grad_scaler=None):
        """Restore w, then the base step with the grad at w + e (via scaler.step + scaler.update if given)."""
        if self._first_grads is not None:
            self._decompose(grad_scaler)
        if self._perturbed is not None:
            self._perturbed.restore()
            self._perturbed = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            if not self._skipped:
                grad_scaler.step(self.base_optimizer)  # unscales, skips the step on non-finite grads
            grad_scaler.update()
        else:
            self.base_optimizer.step()
        self._opt_called = True  # what an LRScheduler's step() wrapper records; first/second_step bypass step()
        self.path_steps += not self._due
        self.schedule.advance(sam=self._due)
        self._due = False
        if zero_grad:
            self.zero_grad()

    def sam_step_due(self):
        """Whether the coming step is a gradient SAM step (else see `step_kind`: a path or a plain step)."""
        return self.step_kind() == "gradient"

    def plain_step(self, zero_grad=False, grad_scaler=None):
        """The base optimizer's step on the current grads (w unperturbed), counted by the schedule; with an
        enabled GradScaler: scaler.step(base) (unscales, skips on non-finite grads) and scaler.update()."""
        if grad_scaler is not None and grad_scaler.is_enabled():
            grad_scaler.step(self.base_optimizer)
            grad_scaler.update()
        else:
            self.base_optimizer.step()
        self._opt_called = True
        self.schedule.advance(sam=False)
        if zero_grad:
            self.zero_grad()

    def _decompose(self, grad_scaler):
        """alpha != 0: GSAM's decomposition of the second-pass grads (unscaled first under a GradScaler)."""
        first, self._first_grads = self._first_grads, None
        if grad_scaler is not None and grad_scaler.is_enabled():
            if self._skipped:
                return
            grad_scaler.unscale_(self.base_optimizer)  # scaler.step(base) then finds them unscaled
        pairs = [(g, p.grad) for p, g in first.items() if p.grad is not None]
        gradient_decompose([g for g, _ in pairs], [h for _, h in pairs], self.alpha)

    def step(self, closure=None, grad_scaler=None):
        """One update; grads at w must exist; `closure` re-does forward and backward (at w + e). A step the
        schedule makes plain is `plain_step` (the closure is not called; returns None)."""
        if closure is None:
            raise ValueError("SAM.step needs a closure doing a full forward and backward pass")
        kind = self.step_kind()
        if kind == "plain":
            self.plain_step(grad_scaler=grad_scaler)
            return None
        closure = torch.enable_grad()(closure)
        PERTURBATIONS[kind](self, grad_scaler)
        loss = closure()
        self.second_step(grad_scaler=grad_scaler)
        return loss

    def zero_grad(self, set_to_none=True):
        self.base_optimizer.zero_grad(set_to_none)

    def state_dict(self):
        state = super().state_dict()
        state["sam_schedule"] = self.schedule.state_dict()  # the step counters: resuming continues the rule
        if self.path is not None:  # theta0 itself comes from the record: its digest proves it is the same one
            state["path"] = {"steps": self.path_steps, "anchor_sha256": self.path.digest}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        schedule = state_dict.pop("sam_schedule", None)
        path = state_dict.pop("path", None)
        if (path is None) != (self.path is None):
            raise ValueError("the optimizer state was saved " + ("without" if path is None else "with") +
                             " a path anchor and this optimizer has " + ("one" if path is None else "none"))
        if path is not None and path.get("anchor_sha256") != self.path.digest:
            raise ValueError("the optimizer state's path anchor (theta0) differs from this optimizer's: resume "
                             "from the same starting weights")
        if schedule is None and not self.schedule.always:
            raise ValueError("the optimizer state has no SAM schedule counters (saved by an older version); it "
                             "cannot continue a schedule that skips SAM steps")
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups  # re-link (davda54/sam#: schedulers, momentum)
        self.base_optimizer.state = self.state
        if schedule is not None:
            self.schedule.load_state_dict(schedule)
        if path is not None:
            self.path_steps = int(path["steps"])


# what a step perturbs along, by `step_kind` (step() calls it before the closure's forward/backward)
PERTURBATIONS = {
    "gradient": lambda sam, scaler: sam.first_step(zero_grad=True, grad_scaler=scaler),  # SAM/ASAM
    "path": lambda sam, scaler: sam.perturb_path(zero_grad=True),  # PAM: towards theta0, one pass
}


@contextlib.contextmanager
def freeze_bn(model):
    """Keep BatchNorm running statistics unchanged inside the block (the SAM second pass).

    Sets every _BatchNorm momentum to 0 (also for momentum=None, the cumulative average) and restores momentum
    and num_batches_tracked on exit, so running_mean/var/num_batches_tracked are exactly as before.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            nbt = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            saved.append((m, m.momentum, nbt))
            m.momentum = 0.0
    try:
        yield model
    finally:
        for m, momentum, nbt in saved:
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
