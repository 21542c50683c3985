"""Host side of the Triton SAM kernels: everything a parameter list needs, built once and reused every step.

A `TritonPlan` groups the tensors by (param dtype, grad dtype, aligned), checks their layouts, writes one device
table and work list per group (see `sam_triton`) in a single host-to-device copy, allocates one `saved` buffer
(or takes the `saved` tensors given) and the norm's scratch (partials, ticket counter, result). After that a
call is one launch per group, under the parameters' device, with arguments prepared once (`sam_triton.Launch`:
after the first, each launch is a call of the compiled kernel's launcher): nothing is allocated, nothing waits
for the GPU, and the same launches can be captured in a CUDA graph. The plan holds raw addresses, so it is valid
only while the params, grads and `saved` stay where they were; `ftsam_plugin.optim.SAM` checks them every step
(`plan_guard`), re-points the tables at grads that moved (`point_grads`) and builds a new plan when anything
else changed. A plan serves one CUDA stream at a time: two streams running its kernels
at once would race on its norm scratch (the partial sums and the ticket counter).
"""

import contextlib
import functools

import torch

from . import sam_triton as st
from .plan_guard import same_layout
from .reference import check_directions
from .reference import scaled_flags

SAVED_ALIGN = 128  # element alignment of each tensor inside the flat `saved` buffer (>= 16 bytes in any dtype)
_STRIDE_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
_PAIRS = frozenset(st.DTYPE_PAIRS)


class LayoutError(ValueError):
    """The Triton kernels cannot take these tensors (dtype pair or memory layout); foreach can."""


def _dense(t):
    fmt = _STRIDE_FORMATS.get(t.ndim)
    return t.is_contiguous() or (fmt is not None and t.is_contiguous(memory_format=fmt))


def _layout_problem(p, g, s, g_name="grad"):
    """Why the kernels cannot take param `p` with grad `g` (None: restore only; a direction: `g_name`) and saved
    `s`; None if they can."""
    g_dtype = p.dtype if g is None else g.dtype
    if (p.dtype, g_dtype) not in _PAIRS:
        pairs = ", ".join(f"{_short(w)}/{_short(d)}" for w, d in st.DTYPE_PAIRS)
        return f"param/{g_name} dtypes {_short(p.dtype)}/{_short(g_dtype)} (the kernels take {pairs})"
    if not _dense(p):
        return f"a non-dense parameter (strides {p.stride()})"
    stride, shape = p.stride(), p.shape
    for name, t in ((g_name, g), ("saved", s)):
        if t is not None and not same_layout(t.shape, t.stride(), shape, stride):
            return f"{name} shape/strides {tuple(t.shape)}/{t.stride()} differ from the parameter's {stride}"
    if s is not None and s.dtype != p.dtype:
        return f"saved dtype {_short(s.dtype)} differs from the parameter's {_short(p.dtype)}"
    return None


def _short(dtype):
    return str(dtype).replace("torch.", "")


def _aligned(p, g, s):
    return p.data_ptr() % 16 == 0 and (g is None or g.data_ptr() % 16 == 0) and (s is None or s.data_ptr() % 16 == 0)


def flat_like(tensors):
    """One allocation holding a tensor shaped and strided like each input, each SAVED_ALIGN-element aligned."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() // SAVED_ALIGN) * SAVED_ALIGN
    flat = torch.empty(total, dtype=tensors[0].dtype, device=tensors[0].device)
    return [flat.as_strided(t.shape, t.stride(), o) for t, o in zip(tensors, offsets)]


@functools.lru_cache(maxsize=64)
def work_list(numels):
    """Host int64 [2, n_work]: row 0 the tensor (index into `numels`) of each program, row 1 its chunk start."""
    counts = torch.tensor([-(-n // st.CHUNK) for n in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts  # each tensor's first program
    start = (torch.arange(len(tensor)) - first[tensor]) * st.CHUNK
    return torch.stack([tensor, start])


def table_words(n):
    """int64 words a group of `n` tensors takes before its work list: the table, padded to an even count so every
    table and work list in the plan's one device block starts 16-byte aligned, as the kernels were compiled for
    (`compile_check` builds every pointer argument 16-byte aligned; an odd 5n would put the next one at 8 mod 16,
    and a launch would compile a variant nobody built ahead)."""
    return st.N_ROWS * n + (st.N_ROWS * n) % 2


def device_guard(device):
    """Context that makes `device` current for the launches (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_device(device):
    if device.type != "cuda" and not (device.type == "cpu" and st.LAUNCH_ON_CPU):
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); use backend='auto'")


class _Group:
    """One launch's worth of tensors: a (param dtype, grad dtype, aligned) group with its device table, and its
    three launches with their arguments prepared (`sam_triton.Launch`)."""

    def __init__(self, key, idx, table, work, pid_offset):
        self.w_dtype, self.g_dtype, self.aligned = key
        self.idx, self.table, self.work, self.pid_offset = idx, table, work, pid_offset
        self.n, self.n_work = len(idx), work.shape[1]
        self.rows = [table[r * self.n:(r + 1) * self.n] for r in range(st.N_ROWS)]  # views, made once
        self.index = torch.tensor(idx, dtype=torch.int64)  # its params' places in the plan's list
        self.grid = (self.n_work,)
        self.options = {kind: st.launch_options(kind, *key) for kind in st.KERNELS}

    def bind(self, plan):
        """The norm, perturb (norm and rho given per call) and restore launches of this group in `plan`."""
        head = (self.table, self.work)
        self.norm = st.Launch("sumsq", self.grid, (*head, plan._partials, plan._counter, plan._out, self.n,
                                                   self.n_work, self.pid_offset, plan._n_total, plan.eta),
                              self.options["sumsq"])
        self.perturb = st.Launch("perturb", self.grid, (*head, plan._out, self.n, self.n_work, 0.0, plan.eta,
                                                        plan.subtract), self.options["perturb"], vary=(2, 5))
        self.restore = st.Launch("restore", self.grid, (*head, self.n, self.n_work, plan.subtract),
                                 self.options["restore"])


class TritonPlan:
    """The Triton route for one fixed list of parameters (each with a grad, unless only restoring `saved`, or
    `directions` given: tensors laid out like the params, read as g in place of their grads).

    grad_norm() -> the plan's own 0-d fp32 result tensor (overwritten by the next call);
    perturb(norm, rho) -> `saved` (old w for restore="copy", e for "subtract"), the plan's own buffer;
    restore() -> w = saved (copy) or w -= saved (subtract).
    Raises LayoutError where the kernels cannot take a tensor, RuntimeError off CUDA (unless interpreted).
    Not for two CUDA streams at once: their norms would share one set of partial sums and one ticket counter.
    """

    def __init__(self, params, adaptive=False, eta=0.0, weights_only=False, restore="copy", saved=None,
                 directions=None):
        self.params = list(params)
        self.device = self.params[0].device
        check_device(self.device)
        # subtract-restore needs e kept (store_e), copy-restore the old w: one flag for both kernels
        self.eta, self.subtract = float(eta), int(restore == "subtract")
        if directions is not None:
            check_directions(self.params, list(directions))
        grads = [p.grad for p in self.params] if directions is None else list(directions)
        g_name = "grad" if directions is None else "direction"
        # `saved` given: restore only; else one flat buffer, allocated (and its addresses written into the
        # tables) at the first perturb, so a norm-only plan allocates nothing big
        self.saved = None if saved is None else list(saved)
        for i, (p, g, s) in enumerate(zip(self.params, grads, self.saved or [None] * len(self.params))):
            problem = _layout_problem(p, g, s, g_name)
            if problem:
                raise LayoutError(f"backend='triton' cannot take parameter {i} (shape {tuple(p.shape)}): {problem}; "
                                  "use backend='foreach'")
        flags = scaled_flags(self.params, adaptive, weights_only)
        self._groups = self._build_groups(grads, flags)
        self._n_total = sum(g.n_work for g in self._groups)
        f32 = dict(dtype=torch.float32, device=self.device)
        self._partials = torch.empty(max(self._n_total, 1), **f32)
        self._counter = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._norm_open = False  # True from a norm's first launch to its last: a norm that never finished
        self._out = torch.zeros((), **f32)  # stays 0 when there is nothing to sum
        self._guard = device_guard(self.device)
        for g in self._groups:
            g.bind(self)

    def _host(self, values):
        """`values` as an int64 host tensor that copies to the device without making the host wait."""
        host = torch.as_tensor(values, dtype=torch.int64)
        return host.pin_memory() if self.device.type == "cuda" else host

    def _upload(self, values):
        return self._host(values).to(self.device, non_blocking=True)

    def _write_row(self, group, row, values):
        group.rows[row].copy_(self._host(values), non_blocking=True)

    def _saved_ptrs(self, idx):
        return [self.saved[i].data_ptr() for i in idx] if self.saved is not None else [0] * len(idx)

    def _build_groups(self, grads, flags):
        keys = {}
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if p.numel():
                s = self.saved[i] if self.saved is not None else None  # the flat buffer is aligned
                keys.setdefault((p.dtype, p.dtype if g is None else g.dtype, _aligned(p, g, s)), []).append(i)
        host, layout = [], []
        for key, idx in keys.items():  # one int64 block per group: the table (rows in ROW_* order), the work list
            numels = tuple(self.params[i].numel() for i in idx)
            rows = [[0 if grads[i] is None else grads[i].data_ptr() for i in idx],
                    [self.params[i].data_ptr() for i in idx], self._saved_ptrs(idx), numels,
                    [int(flags[i]) for i in idx]]
            work = work_list(numels)
            layout.append((key, idx, work.shape[1]))
            pad = torch.zeros(table_words(len(idx)) - st.N_ROWS * len(idx), dtype=torch.int64)
            host += [torch.tensor(rows, dtype=torch.int64).flatten(), pad, work.flatten()]
        dev = self._upload(torch.cat(host) if host else [])
        groups, at, pid_offset = [], 0, 0
        for key, idx, n_work in layout:
            table = dev[at:at + st.N_ROWS * len(idx)]
            at += table_words(len(idx))  # even: the work list after it starts 16-byte aligned, as the next table
            work = dev[at:at + 2 * n_work].view(2, n_work)
            at += 2 * n_work
            groups.append(_Group(key, idx, table, work, pid_offset))
            pid_offset += n_work
        return groups

    def grad_norm(self):
        with self._guard:
            if self._norm_open:  # the last norm stopped between two launches (an exception, Ctrl-C): its
                self._counter.zero_()  # tickets were taken and never reset by a last program; start again at 0
            self._norm_open = True
            for g in self._groups:
                g.norm()
            self._norm_open = False
        return self._out

    def _allocate_saved(self):
        self.saved = flat_like(self.params)
        for g in self._groups:
            self._write_row(g, st.ROW_S, self._saved_ptrs(g.idx))

    def grad_alignment(self):
        """Per param, what its grad's address must stay a multiple of: 16 in an aligned group, else 1."""
        align = [1] * len(self.params)
        for g in self._groups:
            for i in g.idx:
                align[i] = 16 if g.aligned else 1
        return align

    def point_grads(self, ptrs):
        """Write the grads' addresses `ptrs` (an int64 CPU tensor, one per param) into the tables, unchecked: for a
        caller whose own check (plan_guard) found each grad laid out like its param at an address its group
        allows."""
        for g in self._groups:
            self._write_row(g, st.ROW_G, ptrs if g.n == len(self.params) else ptrs[g.index])

    def perturb(self, norm, rho):
        if self.saved is None:
            self._allocate_saved()
        if norm is not self._out:
            norm = norm.to(device=self.device, dtype=torch.float32)
            if norm.data_ptr() % 16:  # the launches were prepared for a 16-byte aligned norm (a fresh tensor is)
                norm = norm.clone()
        rho = float(rho)
        with self._guard:
            for g in self._groups:
                g.perturb(norm, rho)
        return self.saved

    def restore(self):
        if self.saved is None:
            raise RuntimeError("TritonPlan.restore before perturb: nothing is saved yet")
        with self._guard:
            for g in self._groups:
                g.restore()


__all__ = ["LayoutError", "TritonPlan", "check_device", "device_guard", "flat_like", "same_layout", "table_words",
           "work_list"]
