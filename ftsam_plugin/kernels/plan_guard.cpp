// The compiled plan guard (see plan_guard.py for the rule; PythonGuard there is its twin, step for step).
//
//   ref = snapshot(params, alignments)   # bytearray: what each param and its grad were
//   code, index = check(params, ref)     # 0 same, 1 moved (ref updated to the grads' new place), >= 2 stale
//   ptrs = grad_ptrs(params)             # bytearray: each grad's address as an int64 (0: no grad)
//
// ref holds int64 words: n, then per param [ndim, param ptr, dtype, device type, device index, grad ptr,
// grad dtype, alignment, sizes[ndim], param strides[ndim], grad strides[ndim]].
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// codes: the order of plan_guard.REASONS, after SAME and MOVED
enum Code : int64_t {
  SAME = 0, MOVED, PARAM_STORAGE, PARAM_DTYPE, PARAM_SHAPE, PARAM_STRIDES, NO_GRAD, GRAD_DTYPE, GRAD_LAYOUT,
  GRAD_ALIGNMENT
};
constexpr int64_t HEAD = 8;  // words before a param's sizes

int64_t address(const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); }

bool is_params(PyObject* params) {
  if (!PyList_Check(params)) return false;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i)
    if (!THPVariable_Check(PyList_GET_ITEM(params, i))) return false;
  return true;
}

PyObject* snapshot(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !is_params(args[0]) || !PyList_Check(args[1]) ||
      PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1])) {
    PyErr_SetString(PyExc_TypeError, "snapshot(params: list of tensors, alignments: list of int, same length)");
    return nullptr;
  }
  Py_ssize_t n = PyList_GET_SIZE(args[0]);
  std::vector<int64_t> ref{static_cast<int64_t>(n)};
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& p = THPVariable_Unpack(PyList_GET_ITEM(args[0], i));
    const at::Tensor& g = p.grad();
    int64_t align = PyLong_AsLongLong(PyList_GET_ITEM(args[1], i));
    if (!g.defined() || g.dim() != p.dim() || align < 1) {
      if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "param %zd: needs a grad and an alignment >= 1", i);
      return nullptr;
    }
    ref.insert(ref.end(), {p.dim(), address(p), static_cast<int64_t>(p.scalar_type()),
                           static_cast<int64_t>(p.device().type()), p.device().index(), address(g),
                           static_cast<int64_t>(g.scalar_type()), align});
    for (auto v : p.sizes()) ref.push_back(v);
    for (auto v : p.strides()) ref.push_back(v);
    for (auto v : g.strides()) ref.push_back(v);
  }
  return PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(ref.data()), ref.size() * sizeof(int64_t));
}

PyObject* result(int64_t code, Py_ssize_t index) { return Py_BuildValue("(Ln)", static_cast<long long>(code), index); }

// grad strides may differ from the param's only where the size is 1 (or the tensor is empty): same_layout
bool same_layout(c10::IntArrayRef sizes, c10::IntArrayRef strides, const int64_t* param_strides) {
  for (auto s : sizes)
    if (s == 0) return true;
  for (size_t d = 0; d < sizes.size(); ++d)
    if (sizes[d] > 1 && strides[d] != param_strides[d]) return false;
  return true;
}

PyObject* check(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyList_Check(args[0]) || !PyByteArray_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "check(params: list, ref: bytearray from snapshot)");
    return nullptr;
  }
  PyObject* params = args[0];
  int64_t* ref = reinterpret_cast<int64_t*>(PyByteArray_AS_STRING(args[1]));
  Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyByteArray_GET_SIZE(args[1]) < static_cast<Py_ssize_t>(sizeof(int64_t)) || ref[0] != n) {
    PyErr_SetString(PyExc_ValueError, "check: params and ref do not belong together");
    return nullptr;
  }
  bool moved = false;
  int64_t* r = ref + 1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& p = THPVariable_Unpack(PyList_GET_ITEM(params, i));
    int64_t nd = r[0];
    const int64_t *sizes = r + HEAD, *strides = sizes + nd, *grad_strides = strides + nd;
    if (address(p) != r[1] || static_cast<int64_t>(p.device().type()) != r[3] || p.device().index() != r[4])
      return result(PARAM_STORAGE, i);
    if (static_cast<int64_t>(p.scalar_type()) != r[2]) return result(PARAM_DTYPE, i);
    if (p.sizes() != c10::IntArrayRef(sizes, nd)) return result(PARAM_SHAPE, i);
    if (p.strides() != c10::IntArrayRef(strides, nd)) return result(PARAM_STRIDES, i);
    const at::Tensor& g = p.grad();
    if (!g.defined()) return result(NO_GRAD, i);
    if (static_cast<int64_t>(g.scalar_type()) != r[6]) return result(GRAD_DTYPE, i);
    if (g.sizes() != p.sizes()) return result(GRAD_LAYOUT, i);
    if (address(g) != r[5] || g.strides() != c10::IntArrayRef(grad_strides, nd)) {
      if (!same_layout(g.sizes(), g.strides(), strides)) return result(GRAD_LAYOUT, i);
      if (address(g) % r[7]) return result(GRAD_ALIGNMENT, i);
      moved = true;
    }
    r += HEAD + 3 * nd;
  }
  if (moved) {  // every grad fits its slot: where they are now becomes the reference
    r = ref + 1;
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor& g = THPVariable_Unpack(PyList_GET_ITEM(params, i)).grad();
      int64_t nd = r[0];
      r[5] = address(g);
      std::memcpy(r + HEAD + 2 * nd, g.strides().data(), nd * sizeof(int64_t));
      r += HEAD + 3 * nd;
    }
  }
  return result(moved ? MOVED : SAME, -1);
}

PyObject* grad_ptrs(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1 || !PyList_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "grad_ptrs(params: list)");
    return nullptr;
  }
  Py_ssize_t n = PyList_GET_SIZE(args[0]);
  std::vector<int64_t> ptrs(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& g = THPVariable_Unpack(PyList_GET_ITEM(args[0], i)).grad();
    ptrs[i] = g.defined() ? address(g) : 0;
  }
  return PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(ptrs.data()), n * sizeof(int64_t));
}

PyMethodDef methods[] = {
    {"snapshot", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(snapshot)), METH_FASTCALL, nullptr},
    {"check", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(check)), METH_FASTCALL, nullptr},
    {"grad_ptrs", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(grad_ptrs)), METH_FASTCALL, nullptr},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "plan_guard", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_plan_guard() { return PyModule_Create(&module); }
