// fast_list.h: pyreg._C.plain_list (see fast_list.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace pyreg {

void register_plain(pybind11::handle tensor, pybind11::handle parameter, pybind11::handle strided,
                    pybind11::dict dtype_codes, pybind11::dict itemsizes);
pybind11::object plain_list(pybind11::handle tensors, bool written, bool check_inference);
void bind_fast_list(pybind11::module_& m);

}  // namespace pyreg
