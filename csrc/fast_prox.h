// fast_prox.h: pyreg._C.FastProx (see fast_prox.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "common/kernels_api.h"
#include "common/tensor_list.h"

namespace pyreg {

class FastProx {
 public:
  FastProx(pybind11::list groups, pybind11::list buckets, const Kernels& kernels);
  bool same(pybind11::handle groups);
  bool prox(int nthreads);
  void bind_step(pybind11::object opt, pybind11::object step, pybind11::object direct,
                 pybind11::object num_threads, pybind11::object bump, pybind11::list params,
                 pybind11::dict out, pybind11::object last);
  void bind_counts(pybind11::object counts);
  pybind11::tuple step();
  std::vector<size_t> sizes() const;

 private:
  struct Group {
    pybind11::dict dict;
    std::vector<std::pair<pybind11::object, pybind11::object>> items;  // (key, value), in order
    std::vector<pybind11::object> params;  // the params list's contents
    std::vector<PyObject*> types;          // each one's type (held by the param)
    int lr_at = -1, params_at = -1;        // positions among the items
    double lr = 0.0;
  };
  struct Bucket {
    std::vector<pybind11::object> params;
    std::vector<pybind11::object> dtypes;  // each param's dtype
    std::vector<int> group;  // each param's group
    TensorList list;
    Coef l1{nullptr, 0.0}, l2{nullptr, 0.0};
    pybind11::object keep;   // what owns l1's and l2's per-tensor values
    std::vector<double> lr;  // per tensor, from its group
    std::vector<int64_t> nnz;
  };
  void fill_lrs();

  // What step() calls and reads (set by bind_step; step_ is None until then).
  pybind11::object opt_, step_ = pybind11::none(), raw_, direct_, num_threads_, bump_, out_, last_;
  pybind11::list params_;
  pybind11::object counts_ = pybind11::none();  // l1_strength's StrengthCounts (bind_counts), or None

  const Kernels* kernels_;
  pybind11::list groups_;
  std::vector<Group> groups_seen_;
  std::vector<Bucket> buckets_;
};

void bind_fast_prox(pybind11::module_& m, const Kernels& cpu);

}  // namespace pyreg
