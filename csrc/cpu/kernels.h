// kernels.h: pyreg's fused CPU kernels. Each call sweeps a whole TensorList
// (every weight tensor of a model) in ONE parallel region over
// (tensor, chunk) work items. Coefficients (Coef) give one double per tensor.
// Pointers are host pointers; nothing here knows about torch.
#pragma once
#include <cstdint>

#include "../common/tensor_list.h"

namespace pyreg::cpu {

// Per tensor: l1 = sum|w|, l2 = sqrt(sum w^2), linf = max|w|, nnz = #(w != 0).
void weight_stats(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz,
                  int out_dtype, int nthreads);

// out[0] = sum_i l1_i * sum|w_i| + l2_i * sum w_i^2  (c_i = c.at(i)).
void penalty(const TensorList& w, Coef l1, Coef l2, void* out,
             int out_dtype, int nthreads);

// g_i += l1[i] * sign(w_i) + 2 * l2[i] * w_i (g_i has w_i's dtype and layout);
// out[0] = the penalty value of w before the call, from the same pass.
void add_penalty_grad(const TensorList& w, void* const* grads, Coef l1, Coef l2, void* out,
                      int out_dtype, int nthreads);

// w_i <- sign(w_i) * max(|w_i| - lr[i] * l1[i], 0) / (1 + 2 * lr[i] * l2[i]);
// nnz[i] = count of nonzeros of w_i after the step.
void prox(const TensorList& w, Coef l1, Coef l2, Coef lr, int64_t* nnz, int nthreads);

// Instruction set the kernels were compiled for ("avx2+fma+f16c", "sse2", ...).
const char* isa();

}  // namespace pyreg::cpu
