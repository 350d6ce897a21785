// fast_list.h: pyreg._C.plain_list (see fast_list.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace pyreg {

void register_plain(pybind11::handle tensor, pybind11::handle parameter, pybind11::handle strided,
                    pybind11::dict dtype_codes, pybind11::dict itemsizes);
pybind11::object plain_list(pybind11::handle tensors, bool written, bool check_inference, bool cuda,
                            bool check_tracked);
void bind_fast_list(pybind11::module_& m);

// One read of a tensor through torch.Tensor's descriptors, as plain_list
// makes it: the property (dtype, grad) or the no-argument method's result
// (numel, is_contiguous, data_ptr) as a new reference; nullptr (the error
// cleared) on an error or before register_plain.
enum class TensorRead { dtype, grad, numel, is_contiguous, data_ptr };
PyObject* read_tensor(PyObject* t, TensorRead what);

}  // namespace pyreg
