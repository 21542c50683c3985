"""Pure-torch twins of the SAM kernels: `*_loop` (per tensor, like davda54/sam) and `*_foreach` (torch._foreach_*).

Conventions shared by every backend (see ftsam_plugin.kernels):
- only parameters with a `.grad` take part; `perturb` returns `saved` in `with_grad(params)` order and `restore`
  takes that same list (`with_grad(params)` as it was at perturb time), one entry per saved tensor;
- `directions` (a list laid out like `params`) replaces the grads: then every param takes part and reads its
  direction as g (the path-aware step, ftsam_plugin.optim.path, perturbs along d = theta0 - w this way);
- T = |w| + eta for "scaled" tensors (adaptive, and ndim > 1 when weights_only), else 1;
- norm = ||T * g||_2 accumulated in fp32; e = ((T * T) * g) * (rho / (norm + 1e-12)), rounded to the param dtype.
"""

import torch

EPS = 1e-12


def with_grad(params):
    return [p for p in params if p.grad is not None]


def check_directions(params, directions):
    """ValueError unless `directions` holds one tensor per param, shaped like it (the Triton plan also checks their
    strides and dtypes, as it checks grads)."""
    if len(directions) != len(params):
        raise ValueError(f"directions has {len(directions)} tensors for {len(params)} parameters; pass one per "
                         "parameter, in the same order")
    for i, (p, d) in enumerate(zip(params, directions)):
        if d.shape != p.shape:
            raise ValueError(f"directions[{i}] has shape {tuple(d.shape)} but its parameter {tuple(p.shape)}; pass "
                             "tensors laid out like the parameters")


def _with_g(params, directions):
    """(params that take part, their g): those with a grad and their grads, or every param and `directions`."""
    if directions is None:
        ps = with_grad(params)
        return ps, [p.grad for p in ps]
    return list(params), list(directions)


def scaled_flags(params, adaptive, weights_only):
    return [bool(adaptive) and (not weights_only or p.ndim > 1) for p in params]


def zero_norm(params):
    device = params[0].device if params else torch.device("cpu")
    return torch.zeros((), dtype=torch.float32, device=device)


def _fp32(t):
    return t if t.dtype == torch.float32 else t.float()


# ---- loop: one tensor at a time ----
def grad_norm_loop(params, adaptive=False, eta=0.0, weights_only=False, directions=None):
    ps, gs = _with_g(params, directions)
    if not ps:
        return zero_norm(params)
    device = ps[0].device
    norms = []
    for p, g, scaled in zip(ps, gs, scaled_flags(ps, adaptive, weights_only)):
        if scaled:
            g = (_fp32(p.detach()).abs() + eta) * _fp32(g)  # T * g
        norms.append(torch.linalg.vector_norm(g, dtype=torch.float32).to(device))
    return torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def perturb_loop(params, norm, rho, adaptive=False, eta=0.0, store="w", weights_only=False, directions=None):
    ps, gs = _with_g(params, directions)
    scale = rho / (norm + EPS)
    saved = []
    for p, g, scaled in zip(ps, gs, scaled_flags(ps, adaptive, weights_only)):
        g = _fp32(g)
        if scaled:
            t = _fp32(p).abs() + eta
            e = ((t * t) * g) * scale.to(p.device)
        else:
            e = g * scale.to(p.device)
        e = e.to(p.dtype)
        saved.append(e if store == "e" else p.clone())
        p.add_(e)
    return saved


@torch.no_grad()
def restore_loop(params, saved, mode="copy"):
    for p, s in zip(params, saved):
        if mode == "copy":
            p.copy_(s)
        else:
            p.sub_(s)


# ---- foreach: one torch._foreach_* call per (device, dtype) group and op ----
def _groups(ps, gs, flags):
    """(device, w dtype, g dtype, scaled) -> list of indices into ps."""
    out = {}
    for i, (p, g, f) in enumerate(zip(ps, gs, flags)):
        out.setdefault((p.device, p.dtype, g.dtype, f), []).append(i)
    return out


_SCRATCH = {}


def _scratch_like(ts):
    """CPU: views into one reused buffer. Fresh ~45 MB temporaries cost page faults on every call (measured 4x)."""
    key = (ts[0].device, ts[0].dtype)
    total = sum(t.numel() for t in ts)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < total:
        buf = _SCRATCH[key] = torch.empty(total, dtype=ts[0].dtype, device=ts[0].device)
    out, off = [], 0
    for t in ts:
        out.append(buf[off:off + t.numel()].view(t.shape))
        off += t.numel()
    return out


def _tg(ws, gs, eta, square):
    """fp32 list of T*g (square=False, a scratch view on CPU) or T*T*g (square=True, new tensors)."""
    ws = [_fp32(w) for w in ws]
    gs = [_fp32(g) for g in gs]
    if not square and ws[0].device.type == "cpu":
        # per-tensor out= ops: aten's _foreach_*.out variants allocate and copy (measured slower than fresh tensors)
        ts = _scratch_like(ws)
        for w, g, t in zip(ws, gs, ts):
            if eta == 0.0:
                torch.mul(w, g, out=t)  # ||w*g|| == ||abs(w)*g||
            else:
                torch.abs(w, out=t).add_(eta).mul_(g)
        return ts
    if eta == 0.0 and not square:
        return torch._foreach_mul(ws, gs)
    t = torch._foreach_abs(ws)
    if eta != 0.0:
        torch._foreach_add_(t, eta)
    if square:
        torch._foreach_mul_(t, t)
    torch._foreach_mul_(t, gs)
    return t


def grad_norm_foreach(params, adaptive=False, eta=0.0, weights_only=False, directions=None):
    ps, all_gs = _with_g(params, directions)
    if not ps:
        return zero_norm(params)
    device = ps[0].device
    norms = []
    for (_, _, _, scaled), idx in _groups(ps, all_gs, scaled_flags(ps, adaptive, weights_only)).items():
        ws = [ps[i].detach() for i in idx]
        gs = [all_gs[i] for i in idx]
        xs = _tg(ws, gs, eta, square=False) if scaled else gs
        norms.extend(n.to(device) for n in torch._foreach_norm(xs, 2, dtype=torch.float32))
    return torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def perturb_foreach(params, norm, rho, adaptive=False, eta=0.0, store="w", weights_only=False, directions=None):
    ps, all_gs = _with_g(params, directions)
    saved = [None] * len(ps)
    scale = rho / (norm + EPS)
    for (device, dtype, gdtype, scaled), idx in _groups(ps, all_gs, scaled_flags(ps, adaptive, weights_only)).items():
        ws = [ps[i] for i in idx]
        gs = [all_gs[i] for i in idx]
        s = scale.to(device)
        if scaled:
            es = _tg(ws, gs, eta, square=True)
            torch._foreach_mul_(es, s)
        else:
            es = torch._foreach_mul([_fp32(g) for g in gs], s) if gdtype != torch.float32 else torch._foreach_mul(gs, s)
        if dtype != torch.float32:
            es = [e.to(dtype) for e in es]
        if store == "w":
            olds = [torch.empty_like(w) for w in ws]
            torch._foreach_copy_(olds, ws)
            es_or_olds = olds
        else:
            es_or_olds = es
        torch._foreach_add_(ws, es)
        for i, t in zip(idx, es_or_olds):
            saved[i] = t
    return saved


@torch.no_grad()
def restore_foreach(params, saved, mode="copy"):
    if not saved:
        return
    if mode == "copy":
        torch._foreach_copy_(list(params), list(saved))
    else:
        torch._foreach_sub_(list(params), list(saved))


def preact_resnet18_shapes(num_classes=10):
    """Parameter shapes of BackdoorBench's PreActResNet18 in registration order (54 tensors, 11,171,146 for 10
    classes); computed from the architecture, for kernel tests and benchmarks."""
    shapes, in_planes = [(64, 3, 3, 3)], 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for s in (stride, 1):
            shapes += [(in_planes,), (in_planes,), (planes, in_planes, 3, 3), (planes,), (planes,),
                       (planes, planes, 3, 3)]  # bn1 w/b, conv1, bn2 w/b, conv2
            if s != 1 or in_planes != planes:
                shapes.append((planes, in_planes, 1, 1))  # shortcut conv
            in_planes = planes
    return shapes + [(num_classes, 512), (num_classes,)]


# ---- loop / foreach as plans (the interface ftsam_plugin.kernels.create_plan returns) ----
class TorchOps:
    """A backend's three functions."""

    def __init__(self, grad_norm, perturb, restore):
        self.grad_norm, self.perturb, self.restore = grad_norm, perturb, restore


LOOP = TorchOps(grad_norm_loop, perturb_loop, restore_loop)
FOREACH = TorchOps(grad_norm_foreach, perturb_foreach, restore_foreach)


class TorchPlan:
    """The loop or foreach route for a fixed parameter list; `saved` is kept from perturb to restore.

    Nothing is cached on the device: these ops read the params and grads (or `directions`) afresh on every call.
    """

    def __init__(self, ops, params, adaptive=False, eta=0.0, weights_only=False, restore="copy", saved=None,
                 directions=None):
        self.ops, self.params, self.saved = ops, list(params), saved
        self.adaptive, self.eta, self.weights_only, self.mode = adaptive, eta, weights_only, restore
        self.directions = None if directions is None else list(directions)
        if self.directions is not None:
            check_directions(self.params, self.directions)

    def grad_norm(self):
        with torch.no_grad():
            return self.ops.grad_norm(self.params, adaptive=self.adaptive, eta=self.eta,
                                      weights_only=self.weights_only, directions=self.directions)

    def perturb(self, norm, rho):
        store = "e" if self.mode == "subtract" else "w"
        self.saved = self.ops.perturb(self.params, norm, rho, adaptive=self.adaptive, eta=self.eta, store=store,
                                      weights_only=self.weights_only, directions=self.directions)
        return self.saved

    def restore(self):
        self.ops.restore(self.params, self.saved, mode=self.mode)

    def grad_alignment(self):
        return [1] * len(self.params)  # any address: nothing is kept between calls

    def point_grads(self, ptrs):
        pass  # the grads are read afresh on every call
