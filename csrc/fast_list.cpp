// fast_list.cpp: pyreg._C.plain_list, the ops' test of the common case of a
// call on CPU tensors, or on the tensors of one GPU, made in one pass at C
// speed (pyreg/ops.py's fast path).
//
// The common case: a list (or tuple) of at least one tensor, each exactly a
// torch.Tensor or an nn.Parameter (no subclass that could change what its
// data means), all of one supported dtype, dense (strided layout, not nested),
// contiguous, on the CPU (with `cuda`: all on one GPU, whose index it also
// answers), with memory (not a ZeroTensor), without torch's
// negative bit (its memory would hold the negated values); and for an op
// that writes them, none an inference
// tensor (unless inference mode is on: the caller says), none that autograd
// records (requires grad, with a grad_fn: in grad mode, the caller says) and
// no two sharing a byte. What plain_list answers for such a list, the kernels take directly:
// each tensor's data pointer and element count, and the dtype code of all.
// For anything else it answers None, and the caller's general path checks
// (and explains) everything. It accepts exactly what pyreg/_validate.py's
// plain_cpu and disjoint_pointers accept, with fewer reads per tensor:
// torch's attribute getters, without building the tuples and device objects
// the Python form compares.
//
// It uses the Python C API only (no libtorch): tensors are read through their
// Python attributes. The types and dtypes it compares with are registered
// once, by pyreg/_validate.py at import (register_plain).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "fast_list.h"

namespace py = pybind11;

namespace pyreg {
namespace {

struct Registry {
  py::object tensor, parameter, strided;
  std::vector<std::pair<py::object, int>> dtypes;  // (torch dtype, kernel code)
  std::vector<int> itemsize;                       // bytes per element, by code
  // torch.Tensor's descriptors of what is read, looked up once: properties
  // (dtype, layout, is_cpu, is_cuda, is_nested, grad) and no-argument methods (the others), each
  // applied to a tensor as map(torch.Tensor.<name>, ...) would.
  py::object dtype, layout, is_cpu, is_cuda, get_device, is_nested, grad, is_contiguous, is_neg, is_inference,
      data_ptr, numel, requires_grad, grad_fn;
};

Registry* registry = nullptr;  // set once, never freed (the module lives as long)

// Property `descr` (a descriptor of torch.Tensor) of tensor `o`: a new
// reference, or nullptr with the error cleared.
PyObject* get(PyObject* o, PyObject* descr) {
  descrgetfunc f = Py_TYPE(descr)->tp_descr_get;
  PyObject* r = f == nullptr ? nullptr : f(descr, o, reinterpret_cast<PyObject*>(Py_TYPE(o)));
  if (r == nullptr) PyErr_Clear();
  return r;
}

// The no-argument method `descr` (a method descriptor of torch.Tensor)
// called on `o`: a new reference, or nullptr with the error cleared.
PyObject* call0(PyObject* o, PyObject* descr) {
  PyObject* args[1] = {o};
  PyObject* r = PyObject_Vectorcall(descr, args, 1, nullptr);
  if (r == nullptr) PyErr_Clear();
  return r;
}

// Whether property (or, with `method`, the no-argument method) `descr` of `o` is `want`.
bool is(PyObject* o, PyObject* descr, PyObject* want, bool method = false) {
  PyObject* r = method ? call0(o, descr) : get(o, descr);
  if (r == nullptr) return false;
  const bool same = r == want;
  Py_DECREF(r);
  return same;
}

// The no-argument method `descr` of `o` as a non-negative integer, or false.
bool count(PyObject* o, PyObject* descr, unsigned long long* out) {
  PyObject* r = call0(o, descr);
  if (r == nullptr) return false;
  bool ok = PyLong_Check(r);
  if (ok) {
    *out = PyLong_AsUnsignedLongLong(r);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      ok = false;
    }
  }
  Py_DECREF(r);
  return ok;
}

}  // namespace

void register_plain(py::handle tensor, py::handle parameter, py::handle strided, py::dict dtype_codes,
                    py::dict itemsizes) {
  auto* r = new Registry();
  r->tensor = py::reinterpret_borrow<py::object>(tensor);
  r->parameter = py::reinterpret_borrow<py::object>(parameter);
  r->strided = py::reinterpret_borrow<py::object>(strided);
  for (auto [field, name] : {std::pair{&r->dtype, "dtype"}, {&r->layout, "layout"}, {&r->is_cpu, "is_cpu"},
                             {&r->is_cuda, "is_cuda"}, {&r->get_device, "get_device"},
                             {&r->is_nested, "is_nested"}, {&r->grad, "grad"},
                             {&r->is_contiguous, "is_contiguous"}, {&r->is_neg, "is_neg"},
                             {&r->is_inference, "is_inference"}, {&r->data_ptr, "data_ptr"}, {&r->numel, "numel"},
                             {&r->requires_grad, "requires_grad"}, {&r->grad_fn, "grad_fn"}})
    *field = r->tensor.attr(name);
  for (auto item : dtype_codes) {
    const int code = item.second.cast<int>();
    if (code < 0 || code > 255) throw py::value_error("register_plain: a dtype code out of range");
    r->dtypes.emplace_back(py::reinterpret_borrow<py::object>(item.first), code);
    if (int(r->itemsize.size()) <= code) r->itemsize.resize(size_t(code) + 1, 0);
    r->itemsize[size_t(code)] = itemsizes[item.first].cast<int>();
  }
  delete registry;  // a second registration replaces the first
  registry = r;
}

py::object plain_list(py::handle seq, bool written, bool check_inference, bool cuda, bool check_tracked) {
  const Registry* r = registry;
  PyObject* s = seq.ptr();
  if (r == nullptr || !(PyList_CheckExact(s) || PyTuple_CheckExact(s))) return py::none();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(s);
  if (n == 0) return py::none();
  PyObject** items = PySequence_Fast_ITEMS(s);
  PyObject* dtype = nullptr;  // the first tensor's (borrowed from it while it is in the list)
  int code = -1;
  long long device = -1;  // cuda: the first tensor's device index
  py::list ptrs(n), numels(n);
  std::vector<std::pair<unsigned long long, unsigned long long>> spans;  // [start, end) in bytes
  if (written && n > 1) spans.reserve(size_t(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* t = items[i];
    PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(t));
    if (type != r->tensor.ptr() && type != r->parameter.ptr()) return py::none();
    PyObject* d = get(t, r->dtype.ptr());
    if (d == nullptr) return py::none();
    Py_DECREF(d);  // a torch dtype is a long-lived singleton: compared by identity only
    if (dtype == nullptr) {
      for (const auto& [obj, c] : r->dtypes)
        if (obj.ptr() == d) code = c;
      if (code < 0) return py::none();
      dtype = d;
    } else if (d != dtype) {
      return py::none();
    }
    if (cuda) {  // on one GPU
      unsigned long long index = 0;
      if (!is(t, r->is_cuda.ptr(), Py_True) || !count(t, r->get_device.ptr(), &index)) return py::none();
      if (i == 0) {
        device = static_cast<long long>(index);
      } else if (static_cast<long long>(index) != device) {
        return py::none();
      }
    }
    if (!is(t, r->layout.ptr(), r->strided.ptr()) || (!cuda && !is(t, r->is_cpu.ptr(), Py_True)) ||
        !is(t, r->is_nested.ptr(), Py_False) ||
        !is(t, r->is_contiguous.ptr(), Py_True, true) || !is(t, r->is_neg.ptr(), Py_False, true))
      return py::none();
    if (written && check_inference && !is(t, r->is_inference.ptr(), Py_False, true)) return py::none();
    // (a tensor that autograd records, written in grad mode: the general path refuses it)
    if (written && check_tracked && !is(t, r->requires_grad.ptr(), Py_False) && !is(t, r->grad_fn.ptr(), Py_None))
      return py::none();
    unsigned long long ptr = 0, numel = 0;
    if (!count(t, r->data_ptr.ptr(), &ptr) || !count(t, r->numel.ptr(), &numel)) return py::none();
    if (ptr == 0 && numel > 0) return py::none();  // no memory (a ZeroTensor)
    PyObject* p = PyLong_FromUnsignedLongLong(ptr);
    PyObject* m = p == nullptr ? nullptr : PyLong_FromUnsignedLongLong(numel);
    if (m == nullptr) {
      Py_XDECREF(p);
      throw py::error_already_set();
    }
    PyList_SET_ITEM(ptrs.ptr(), i, p);  // steals the references
    PyList_SET_ITEM(numels.ptr(), i, m);
    if (written && n > 1) spans.emplace_back(ptr, ptr + numel * unsigned(r->itemsize[size_t(code)]));
  }
  if (written && n > 1) {  // no two share a byte: sorted by start, each ends at or before the next starts
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i)
      if (spans[i - 1].second > spans[i].first) return py::none();
  }
  py::list codes(n);
  py::int_ c(code);
  for (Py_ssize_t i = 0; i < n; ++i) codes[size_t(i)] = c;
  if (cuda) return py::make_tuple(ptrs, numels, codes, device);
  return py::make_tuple(ptrs, numels, codes);
}

PyObject* read_tensor(PyObject* t, TensorRead what) {
  const Registry* r = registry;
  if (r == nullptr) return nullptr;
  switch (what) {
    case TensorRead::dtype: return get(t, r->dtype.ptr());
    case TensorRead::grad: return get(t, r->grad.ptr());
    case TensorRead::numel: return call0(t, r->numel.ptr());
    case TensorRead::is_contiguous: return call0(t, r->is_contiguous.ptr());
    case TensorRead::data_ptr: return call0(t, r->data_ptr.ptr());
  }
  return nullptr;
}

void bind_fast_list(py::module_& m) {
  m.def("register_plain", &register_plain, py::arg("tensor"), py::arg("parameter"), py::arg("strided"),
        py::arg("dtype_codes"), py::arg("itemsizes"),
        "Registers the types, layout and dtypes (with their kernel codes and sizes) plain_list compares with.");
  m.def("plain_list", &plain_list, py::arg("tensors"), py::arg("written"), py::arg("check_inference"),
        py::arg("cuda") = false, py::arg("check_tracked") = false,
        "(data pointers, numels, dtype codes) of a list of plain contiguous CPU tensors of one supported "
        "dtype (written: also pairwise disjoint, with check_inference no inference tensor, and with "
        "check_tracked none that requires grad and has a grad_fn), else None; "
        "with cuda, of such tensors all on one GPU, with its index: (pointers, numels, codes, index).");
}

}  // namespace pyreg
