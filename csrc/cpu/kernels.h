// kernels.h: pyreg's CPU kernels (the contracts of csrc/common/kernels_api.h,
// on host memory, run on pyreg's thread pool). One translation unit per
// family of ops, compiled in parallel:
//   elementwise.cpp  weight_stats, penalty, add_penalty_grad, prox, l2_bound
//   group.cpp        group_norms, group_prox, max_norm, the group penalty
//   optim.cpp        the fused optimizer step
//   select.cpp       kth_abs, push_kth, metric_target
//   table.cpp        the Kernels table of the build
// with the chunking, sweeps and parallel run they share in sweep.h.
//
// On x86-64 each is built once per instruction-set variant (csrc/cpu/isa/),
// its entry points in that variant's namespace (PYREG_ISA_NS), so the linker
// never hands one variant another's code; csrc/cpu/dispatch.cpp chooses a
// variant's table at load time.
#pragma once
#include <cstdint>
#include <string>

#include "../common/dtype.h"  // PYREG_ISA_NS
#include "../common/kernels_api.h"

namespace pyreg::cpu {
namespace PYREG_ISA_NS {

// elementwise.cpp
void weight_stats(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz, int out_dtype,
                  const Launch& at);
void penalty(const TensorList& w, const void* const* refs, Coef l1, Coef l2, void* out, int out_dtype,
             const Launch& at);
void add_penalty_grad(const TensorList& w, const void* const* refs, void* const* grads, Coef l1, Coef l2,
                      void* out, int out_dtype, const Launch& at);
void prox(const TensorList& w, const void* const* refs, Coef l1, Coef l2, Coef lr, int64_t* nnz,
          const Launch& at);
void l2_bound(const TensorList& w, double* lam, double* kappa, int64_t* steps, Coef bound, Coef mu, Coef warmup,
              const Launch& at);

// group.cpp
void group_norms(const TensorList& w, const GroupList& gl, void* norms, int out_dtype, const Launch& at);
void group_prox(const TensorList& w, const GroupList& gl, Coef l1, Coef group_l1, Coef l2, Coef lr,
                int64_t* nonzero, const Launch& at);
void max_norm(const TensorList& w, const GroupList& gl, Coef max_value, int64_t* clipped, const Launch& at);
void group_penalty(const TensorList& w, const GroupList& gl, Coef group_l1, void* out, int out_dtype,
                   const Launch& at);
void add_group_penalty_grad(const TensorList& w, const GroupList& gl, void* const* grads, Coef group_l1,
                            void* out, int out_dtype, const Launch& at);

// optim.cpp
void optim_step(const OptimList& l, const OptimSpec& spec, const Launch& at);

// select.cpp
void kth_abs(const TensorList& w, const int64_t* k, bool closest, double* out, const Launch& at);
void push_kth(const TensorList& m, const void* const* v, const double* e, const double* s, const void* const* w,
              const double* wd, const GroupList* groups, const int64_t* k, double* out, const Launch& at);
void metric_target(const TensorList& w, const void* const* v, const double* e, const double* s, const int64_t* k,
                   bool closest, const double* m, const double* l2, double* l1, const Launch& at);

// table.cpp: the instruction set the variant was compiled for.
std::string isa();

}  // namespace PYREG_ISA_NS
}  // namespace pyreg::cpu
