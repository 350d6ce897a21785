// strength_counts.cpp: pyreg._C.StrengthCounts, the count of the steps of
// each parameter of l1_strength and group_strength (pyreg/optim/apply.py's strength_due and
// record_strength_step) at C speed, for the steps where nothing else changed:
// the fused optimizers' steps that reuse their kernel lists, and
// pyreg.Regularized's fast step (csrc/fast_prox.cpp).
//
// Built from what a step in Python counted: the optimizer's state (a dict
// keyed by parameter), and for each parameter its refresh period k and shift
// (a refresh at its count t with t >= k and (t + shift) % k == 0). Each
// parameter's count is the one its state dict holds (under `step_key`), so
// whichever path counted the steps before, the state is the one record. A
// step first finds the state as seen: the same state object, each parameter's
// state dict and its coefficient entry (under `l1_key`, or the key its entry
// names: the 0-dim view of the vector that the kernels read, l1_strength's l1
// or group_strength's group_l1) the same objects, and each count a
// non-negative int;
// then decides whether a refresh is due at this step; where none is, the
// caller counts the step (after the inner step where one can raise): each
// count plus one, written back, and each bucket's `steps_taken` (Python's
// copy of the counts) set to None, so that Python reads them back from the
// state when it next counts.
//
// It uses the Python C API only (no libtorch).
#include <pybind11/pybind11.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "strength_counts.h"

namespace py = pybind11;

namespace pyreg {

StrengthCounts::StrengthCounts(py::object state, py::str l1_key, py::str step_key, py::list entries,
                               py::list buckets)
    : state_(std::move(state)), l1_key_(std::move(l1_key)), step_key_(std::move(step_key)),
      steps_taken_(py::str("steps_taken")) {
  if (!PyDict_Check(state_.ptr())) throw std::invalid_argument("StrengthCounts: the state is not a dict");
  for (py::handle h : entries) {  // (param, k, shift) or (param, k, shift, its l1 key) each
    py::tuple t = h.cast<py::tuple>();
    if (t.size() != 3 && t.size() != 4)
      throw std::invalid_argument("StrengthCounts: an entry is not a 3-tuple or a 4-tuple");
    Counted c;
    c.param = py::reinterpret_borrow<py::object>(t[0]);
    c.k = t[1].cast<int64_t>();
    c.shift = t[2].cast<int64_t>();
    c.key = t.size() == 4 ? py::object(t[3].cast<py::str>()) : l1_key_;
    if (c.k < 1 || c.shift < 0)
      throw std::invalid_argument("StrengthCounts: a refresh period below 1 or a negative shift");
    PyObject* d = PyDict_GetItemWithError(state_.ptr(), c.param.ptr());
    if (d == nullptr || !PyDict_Check(d)) {
      if (PyErr_Occurred()) throw py::error_already_set();
      throw std::invalid_argument("StrengthCounts: a parameter has no state dict");
    }
    c.dict = py::reinterpret_borrow<py::object>(d);
    PyObject* e = PyDict_GetItemWithError(d, c.key.ptr());
    if (e == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      throw std::invalid_argument("StrengthCounts: a parameter has no l1 in its state");
    }
    c.entry = py::reinterpret_borrow<py::object>(e);
    counted_.push_back(std::move(c));
  }
  for (py::handle b : buckets) buckets_.push_back(py::reinterpret_borrow<py::object>(b));
}

int StrengthCounts::due(PyObject* state, std::vector<long long>* counts) const {
  if (state != state_.ptr()) return -1;
  bool due = false;
  counts->clear();
  for (const Counted& c : counted_) {
    PyObject* d = PyDict_GetItemWithError(state, c.param.ptr());  // (borrowed; no default made)
    PyObject* e = d == c.dict.ptr() ? PyDict_GetItemWithError(d, c.key.ptr()) : nullptr;
    PyObject* n = e == c.entry.ptr() ? PyDict_GetItemWithError(d, step_key_.ptr()) : nullptr;
    if (n == nullptr || !PyLong_CheckExact(n)) {
      PyErr_Clear();
      return -1;
    }
    const long long t = PyLong_AsLongLong(n);
    if (t < 0 || t == LLONG_MAX) {  // (an overflow too: -1 with an error)
      PyErr_Clear();
      return -1;
    }
    counts->push_back(t);
    const long long next = t + 1;  // this step's count
    due = due || (next >= c.k && (next + c.shift) % c.k == 0);
  }
  return due ? 1 : 0;
}

void StrengthCounts::count(const std::vector<long long>& counts) const {
  for (size_t i = 0; i < counted_.size(); ++i) {
    py::object t = py::reinterpret_steal<py::object>(PyLong_FromLongLong(counts[i] + 1));
    if (!t || PyDict_SetItem(counted_[i].dict.ptr(), step_key_.ptr(), t.ptr()) < 0) throw py::error_already_set();
  }
  for (const py::object& b : buckets_)
    if (PyObject_SetAttr(b.ptr(), steps_taken_.ptr(), Py_None) < 0) throw py::error_already_set();
}

int StrengthCounts::step(py::handle state) const {
  std::vector<long long> counts;
  const int answer = due(state.ptr(), &counts);
  if (answer == 0) count(counts);
  return answer;
}

void bind_strength_counts(py::module_& m) {
  py::class_<StrengthCounts>(m, "StrengthCounts",
                             "l1_strength's and group_strength's counts of steps, kept in the optimizer's state "
                             "(csrc/strength_counts.cpp).")
      .def(py::init<py::object, py::str, py::str, py::list, py::list>(), py::arg("state"), py::arg("l1_key"),
           py::arg("step_key"), py::arg("entries"), py::arg("buckets"),
           "The optimizer's `state`, the keys of the l1 and of the count in each param's state dict, "
           "(param, k, shift) of each counted param (a refresh at its count t with t >= k and "
           "(t + shift) % k == 0; a 4th item: the key of its coefficient in place of the l1's), and the "
           "Buckets whose steps_taken each counted step sets to None.")
      .def(
          "due",
          [](const StrengthCounts& c, py::handle state) {
            std::vector<long long> counts;
            return c.due(state.ptr(), &counts);
          },
          py::arg("state"),
          "-1: `state` is not as seen, 1: a refresh is due at the next step, 0: neither; nothing counted.")
      .def("step", &StrengthCounts::step, py::arg("state"),
           "-1: `state` is not as seen, 1: a refresh is due at this step (nothing done either way); 0: "
           "the step counted (each count plus one, in the state).");
}

}  // namespace pyreg
