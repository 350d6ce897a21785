// fast_prox.cpp: pyreg._C.FastProx, the fast path of pyreg.Regularized's
// proximal step in its common case (every regularized parameter in a plain
// element-wise L1/L2 bucket of dense CPU tensors, every lr a float).
//
// Python (pyreg/optim/regularized.py) builds one after a step whose checks
// all ran, from what that step saw. At each later step, `same(groups)` tells,
// at C speed, whether the param groups are still exactly as seen: the same
// list, the same dicts holding the same keys and values (by identity: the
// object holds references to them, so no other object can take their ids),
// the same parameters of the same type, and each regularized one with a
// grad, the same dtype, size and memory, contiguous. The one change it accepts is an lr set to another
// finite float >= 0 (a scheduler's step), which it takes in. Anything else
// answers false, and the caller's full path checks (and raises on) it.
// `prox(nthreads)`, after the inner optimizer's step, runs the CPU prox
// kernel on the buckets, with the GIL released, once it has found each
// regularized tensor at the data pointer seen (else it does nothing and
// answers false: the caller takes the full path). `step()` makes the whole
// step in one call where the inner optimizer's step is torch's wrapped one
// (bind_step): same(), the inner step as torch's wrapper runs it less the
// global hooks (those ran around pyreg.Regularized's own step), prox(), the
// parameters' version bump; it leaves an inner optimizer with step hooks of
// its own, and everything that changed, to the caller. With l1_strength
// (bind_counts), step() also counts the step of each of its parameters in
// the inner optimizer's state (csrc/strength_counts.cpp), after the inner
// step, once it has found that state as seen; where a refresh is due at this
// step, it does nothing and says so (the caller's path in Python refreshes).
//
// It uses the Python C API only (no libtorch): tensors are read through
// torch.Tensor's descriptors, as pyreg._C.plain_list reads them (grad, dtype,
// data_ptr(), numel(), is_contiguous()).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <initializer_list>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/kernels_api.h"
#include "common/tensor_list.h"
#include "fast_list.h"
#include "fast_prox.h"
#include "strength_counts.h"

namespace py = pybind11;

namespace pyreg {
namespace {

// A new reference to attribute `name` of `o`, or nullptr with the error cleared.
PyObject* attr(PyObject* o, PyObject* name) {
  PyObject* r = PyObject_GetAttr(o, name);
  if (r == nullptr) PyErr_Clear();
  return r;
}

// The value of tensor `t`'s read `what` (an integer) as T, or false.
template <typename T>
bool int_of(PyObject* t, TensorRead what, T* out) {
  PyObject* r = read_tensor(t, what);
  if (r == nullptr) return false;
  const bool ok = PyLong_Check(r);
  if (ok) *out = std::is_signed<T>::value ? T(PyLong_AsLongLong(r)) : T(PyLong_AsUnsignedLongLong(r));
  Py_DECREF(r);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return ok;
}

// Whether regularized parameter `p` still has the dtype `dtype` and a grad,
// `numel` elements and is contiguous. false on any difference or error.
bool as_seen(PyObject* p, PyObject* dtype, int64_t numel) {
  PyObject* dt = read_tensor(p, TensorRead::dtype);
  if (dt == nullptr) return false;
  Py_DECREF(dt);  // a torch dtype is a long-lived singleton: compared by identity only
  if (dt != dtype) return false;
  PyObject* g = read_tensor(p, TensorRead::grad);
  if (g == nullptr) return false;
  Py_DECREF(g);
  if (g == Py_None) return false;
  long long got = -1;
  if (!int_of(p, TensorRead::numel, &got) || got != numel) return false;
  PyObject* r = read_tensor(p, TensorRead::is_contiguous);
  if (r == nullptr) return false;
  Py_DECREF(r);
  return r == Py_True;
}

// Whether `p`'s data pointer is still `ptr` (its memory was not replaced).
bool same_memory(PyObject* p, uintptr_t ptr) {
  unsigned long long got = 0;
  return int_of(p, TensorRead::data_ptr, &got) && got == ptr;
}

}  // namespace

FastProx::FastProx(py::list groups, py::list buckets, const Kernels& kernels)
    : kernels_(&kernels), groups_(groups) {
  for (py::handle gh : groups) {
    if (!PyDict_CheckExact(gh.ptr())) throw std::invalid_argument("FastProx: a param group is not a dict");
    Group g;
    g.dict = py::reinterpret_borrow<py::dict>(gh);
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(gh.ptr(), &pos, &k, &v)) {
      if (PyUnicode_Check(k) && PyUnicode_CompareWithASCIIString(k, "lr") == 0) {
        if (!PyFloat_CheckExact(v)) throw std::invalid_argument("FastProx: an lr is not a float");
        g.lr_at = int(g.items.size());
        g.lr = PyFloat_AS_DOUBLE(v);
      }
      if (PyUnicode_Check(k) && PyUnicode_CompareWithASCIIString(k, "params") == 0) {
        if (!PyList_CheckExact(v)) throw std::invalid_argument("FastProx: a group's params is not a list");
        for (py::handle p : py::reinterpret_borrow<py::list>(v)) {
          g.params.push_back(py::reinterpret_borrow<py::object>(p));
          g.types.push_back(reinterpret_cast<PyObject*>(Py_TYPE(p.ptr())));
        }
        g.params_at = int(g.items.size());
      }
      g.items.emplace_back(py::reinterpret_borrow<py::object>(k), py::reinterpret_borrow<py::object>(v));
    }
    if (g.lr_at < 0 || g.params_at < 0) throw std::invalid_argument("FastProx: a group has no lr or params");
    groups_seen_.push_back(std::move(g));
  }
  for (py::handle bh : buckets) {
    // (params, group index of each, dtype codes, (l1 pointer, value), (l2 pointer, value), keep-alive)
    py::tuple t = py::reinterpret_borrow<py::tuple>(bh);
    if (t.size() != 6) throw std::invalid_argument("FastProx: a bucket is not a 6-tuple");
    Bucket b;
    py::list ps = t[0].cast<py::list>();
    b.group = t[1].cast<std::vector<int>>();
    b.list.dtypes = t[2].cast<std::vector<int>>();
    auto l1 = t[3].cast<std::pair<uintptr_t, double>>();
    auto l2 = t[4].cast<std::pair<uintptr_t, double>>();
    b.l1 = Coef{reinterpret_cast<const double*>(l1.first), l1.second};
    b.l2 = Coef{reinterpret_cast<const double*>(l2.first), l2.second};
    b.keep = py::reinterpret_borrow<py::object>(t[5]);
    if (b.group.size() != ps.size() || b.list.dtypes.size() != ps.size())
      throw std::invalid_argument("FastProx: a bucket's lists differ in length");
    for (size_t i = 0; i < ps.size(); ++i) {
      PyObject* p = ps[i].ptr();
      if (b.group[i] < 0 || size_t(b.group[i]) >= groups_seen_.size())
        throw std::invalid_argument("FastProx: a group index is out of range");
      if (b.list.dtypes[i] < 0 || b.list.dtypes[i] > 3) throw std::invalid_argument("FastProx: unknown dtype code");
      py::object r = py::reinterpret_steal<py::object>(read_tensor(p, TensorRead::data_ptr));
      py::object m = py::reinterpret_steal<py::object>(read_tensor(p, TensorRead::numel));
      py::object dt = py::reinterpret_steal<py::object>(read_tensor(p, TensorRead::dtype));
      if (!r || !m || !dt) throw std::invalid_argument("FastProx: a parameter is not a tensor");
      b.params.push_back(py::reinterpret_borrow<py::object>(p));
      b.dtypes.push_back(dt);
      b.list.ptrs.push_back(reinterpret_cast<void*>(r.cast<uintptr_t>()));
      b.list.numels.push_back(m.cast<int64_t>());
      if (!as_seen(p, dt.ptr(), b.list.numels.back()))
        throw std::invalid_argument("FastProx: a regularized parameter has no grad or is not contiguous");
    }
    b.lr.assign(ps.size(), 0.0);
    b.nnz.assign(ps.size(), 0);
    buckets_.push_back(std::move(b));
  }
  fill_lrs();
}

void FastProx::fill_lrs() {
  for (Bucket& b : buckets_)
    for (size_t i = 0; i < b.lr.size(); ++i) b.lr[i] = groups_seen_[size_t(b.group[i])].lr;
}

bool FastProx::same(py::handle groups) {
  PyObject* gl = groups.ptr();
  if (gl != groups_.ptr() || !PyList_CheckExact(gl) || PyList_GET_SIZE(gl) != Py_ssize_t(groups_seen_.size()))
    return false;
  // New lrs are taken in only once everything else was found the same.
  std::vector<std::pair<size_t, PyObject*>> new_lrs;
  for (size_t gi = 0; gi < groups_seen_.size(); ++gi) {
    const Group& g = groups_seen_[gi];
    PyObject* d = PyList_GET_ITEM(gl, Py_ssize_t(gi));
    if (d != g.dict.ptr() || PyDict_Size(d) != Py_ssize_t(g.items.size())) return false;
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    size_t i = 0;
    while (PyDict_Next(d, &pos, &k, &v)) {
      if (i >= g.items.size() || k != g.items[i].first.ptr()) return false;
      if (v != g.items[i].second.ptr()) {
        if (int(i) != g.lr_at || !PyFloat_CheckExact(v)) return false;
        const double lr = PyFloat_AS_DOUBLE(v);
        if (!std::isfinite(lr) || lr < 0) return false;
        new_lrs.emplace_back(gi, v);
      }
      ++i;
    }
    PyObject* ps = g.items[size_t(g.params_at)].second.ptr();  // the same list object: its contents now
    if (PyList_GET_SIZE(ps) != Py_ssize_t(g.params.size())) return false;
    for (size_t j = 0; j < g.params.size(); ++j) {
      PyObject* p = PyList_GET_ITEM(ps, Py_ssize_t(j));
      if (p != g.params[j].ptr() || reinterpret_cast<PyObject*>(Py_TYPE(p)) != g.types[j]) return false;
    }
  }
  for (const Bucket& b : buckets_)  // (memory moved, e.g. .data replaced: the full path checks for sharing)
    for (size_t i = 0; i < b.params.size(); ++i)
      if (!as_seen(b.params[i].ptr(), b.dtypes[i].ptr(), b.list.numels[i]) ||
          !same_memory(b.params[i].ptr(), reinterpret_cast<uintptr_t>(b.list.ptrs[i])))
        return false;
  if (!new_lrs.empty()) {
    for (auto& [gi, v] : new_lrs) {
      Group& g = groups_seen_[gi];
      g.items[size_t(g.lr_at)].second = py::reinterpret_borrow<py::object>(v);
      g.lr = PyFloat_AS_DOUBLE(v);
    }
    fill_lrs();
  }
  return true;
}

bool FastProx::prox(int nthreads) {
  for (const Bucket& b : buckets_)  // the inner step may have replaced a tensor's memory
    for (size_t i = 0; i < b.params.size(); ++i)
      if (!same_memory(b.params[i].ptr(), reinterpret_cast<uintptr_t>(b.list.ptrs[i]))) return false;
  py::gil_scoped_release nogil;
  for (Bucket& b : buckets_)
    kernels_->prox(b.list, nullptr, b.l1, b.l2, Coef{b.lr.data(), 0.0}, b.nnz.data(),
                   Launch{nullptr, -1, 0, nthreads});
  return true;
}

void FastProx::bind_step(py::object opt, py::object step, py::object direct, py::object num_threads,
                         py::object bump, py::list params, py::dict out, py::object last) {
  raw_ = step.attr("__wrapped__");  // torch's hooked step wraps the optimizer's own
  opt_ = std::move(opt);
  direct_ = std::move(direct);
  num_threads_ = std::move(num_threads);
  bump_ = std::move(bump);
  params_ = std::move(params);
  out_ = std::move(out);
  last_ = std::move(last);
  step_ = std::move(step);
}

void FastProx::bind_counts(py::object counts) {
  if (!py::isinstance<StrengthCounts>(counts)) throw py::type_error("FastProx.bind_counts takes a StrengthCounts");
  counts_ = std::move(counts);
}

namespace {

struct Names {
  py::object param_groups = py::str("param_groups"), step = py::str("step"),
             pre = py::str("_optimizer_step_pre_hooks"), post = py::str("_optimizer_step_post_hooks"),
             step_code = py::str("_optimizer_step_code"), last = py::str("last"), penalty = py::str("penalty"),
             state = py::str("state");
};

const Names& names() {
  static const Names* n = new Names();  // interned once, never freed (the module lives as long)
  return *n;
}

// A new reference to the result of `f` called on `args`, or an exception for Python.
py::object call(PyObject* f, std::initializer_list<PyObject*> args) {
  PyObject* r = PyObject_Vectorcall(f, const_cast<PyObject**>(args.begin()), args.size(), nullptr);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// Whether attribute `name` of `o` is a non-empty container (false on any error).
bool nonempty(PyObject* o, PyObject* name) {
  PyObject* d = attr(o, name);
  if (d == nullptr) return true;
  const Py_ssize_t n = PyObject_Length(d);
  Py_DECREF(d);
  if (n < 0) PyErr_Clear();
  return n != 0;
}

}  // namespace

py::tuple FastProx::step() {
  // 0: nothing done (the caller's full path checks everything); 3: nothing
  // done, the inner optimizer has step hooks (the caller runs them); 4:
  // nothing done, an l1_strength refresh is due (the caller's path refreshes).
  const auto status = [](int s, py::object loss = py::none()) { return py::make_tuple(s, std::move(loss)); };
  if (step_.is_none()) return status(0);
  const Names& n = names();
  PyObject* opt = opt_.ptr();
  PyObject* type_step = attr(reinterpret_cast<PyObject*>(Py_TYPE(opt)), n.step.ptr());
  if (type_step == nullptr) return status(0);
  Py_DECREF(type_step);  // compared by identity only (step_ holds the one seen)
  if (type_step != step_.ptr()) return status(0);
  PyObject* groups = attr(opt, n.param_groups.ptr());
  if (groups == nullptr) return status(0);
  const bool as_before = same(groups);
  Py_DECREF(groups);
  if (!as_before) return status(0);
  // None under a user dispatch mode or another backend: the ops decide
  if (call(direct_.ptr(), {}).is_none()) return status(0);
  if (nonempty(opt, n.pre.ptr()) || nonempty(opt, n.post.ptr())) return status(3);
  std::vector<long long> counts;
  const StrengthCounts* counter = counts_.is_none() ? nullptr : counts_.cast<const StrengthCounts*>();
  if (counter != nullptr) {
    PyObject* state = attr(opt, n.state.ptr());
    if (state == nullptr) return status(0);
    Py_DECREF(state);  // compared by identity only (the counter holds the one seen)
    const int due = counter->due(state, &counts);
    if (due < 0) return status(0);
    if (due > 0) return status(4);
  }
  py::object loss = call(raw_.ptr(), {opt});
  PyObject* code = PyObject_CallMethodNoArgs(opt, n.step_code.ptr());  // as torch's wrapper does
  if (code == nullptr) throw py::error_already_set();
  Py_DECREF(code);
  const int nthreads = py::cast<int>(call(num_threads_.ptr(), {}));
  if (counter != nullptr) counter->count(counts);  // (the inner step ran: the step counts)
  if (!prox(nthreads)) return status(2, loss);  // the inner step replaced a tensor's memory: the caller's prox
  call(bump_.ptr(), {params_.ptr()});
  if (PyDict_SetItem(out_.ptr(), n.last.ptr(), last_.ptr()) < 0 ||
      PyDict_SetItem(out_.ptr(), n.penalty.ptr(), Py_None) < 0)
    throw py::error_already_set();
  return status(1, loss);
}

std::vector<size_t> FastProx::sizes() const {
  std::vector<size_t> out;
  for (const Bucket& b : buckets_) out.push_back(b.params.size());
  return out;
}

void bind_fast_prox(py::module_& m, const Kernels& cpu) {
  const Kernels* k = &cpu;
  py::class_<FastProx>(m, "FastProx",
                       "pyreg.Regularized's fast path of the element-wise prox on the CPU "
                       "(csrc/fast_prox.cpp).")
      .def(py::init([k](py::list groups, py::list buckets) { return new FastProx(groups, buckets, *k); }),
           py::arg("groups"), py::arg("buckets"))
      .def("same", &FastProx::same, py::arg("groups"),
           "Whether the groups are as seen (an lr may be another finite float >= 0: taken in).")
      .def("prox", &FastProx::prox, py::arg("nthreads"),
           "The prox of every bucket (CPU kernels), when every tensor still has the memory seen "
           "(else nothing is done, and false returned).")
      .def("bind_step", &FastProx::bind_step, py::arg("opt"), py::arg("step"), py::arg("direct"),
           py::arg("num_threads"), py::arg("bump"), py::arg("params"), py::arg("out"), py::arg("last"),
           "What step() runs: the inner optimizer `opt`, its class's hooked `step` as seen, what answers "
           "None where the CPU kernels may not be called directly, torch's thread count, the version bump of `params`, and the dict `out` "
           "whose 'last' becomes `last` (and 'penalty' None) after each step.")
      .def("bind_counts", &FastProx::bind_counts, py::arg("counts"),
           "l1_strength's counts that step() keeps: a StrengthCounts of the inner optimizer's state.")
      .def("step", &FastProx::step,
           "The whole fast step: (status, loss). 1: same(), the inner step (torch's wrapper's work but "
           "the global hooks), prox(), the version bump (with bind_counts: the state as seen, no refresh "
           "due, and the step counted after the inner step); 0: nothing done, something changed; 2: the "
           "inner step ran (and was counted) and replaced a tensor's memory (no prox done); 3: nothing "
           "done, the inner optimizer has step hooks; 4: nothing done, an l1_strength refresh is due.")
      .def("sizes", &FastProx::sizes, "The number of tensors of each bucket (one kernel call each).");
}

}  // namespace pyreg
