// strength_counts.h: pyreg._C.StrengthCounts (see strength_counts.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace pyreg {

class StrengthCounts {
 public:
  StrengthCounts(pybind11::object state, pybind11::str l1_key, pybind11::str step_key, pybind11::list entries,
                 pybind11::list buckets);
  // -1: `state` is not as seen (nothing read further); 1: a refresh is due
  // at this step; 0: neither. `counts` gets each param's count before it.
  int due(PyObject* state, std::vector<long long>* counts) const;
  // Writes each count plus one into its param's state, and clears the
  // buckets' copy of the counts.
  void count(const std::vector<long long>& counts) const;
  // due(), then count() where it answers 0: the answer.
  int step(pybind11::handle state) const;

 private:
  struct Counted {
    pybind11::object param, dict, entry;  // the param, its state dict and the l1 entry in it, as seen
    pybind11::object key;                 // the key of that entry
    int64_t k = 1, shift = 0;
  };
  std::vector<Counted> counted_;
  pybind11::object state_, l1_key_, step_key_, steps_taken_;
  std::vector<pybind11::object> buckets_;
};

void bind_strength_counts(pybind11::module_& m);

}  // namespace pyreg
