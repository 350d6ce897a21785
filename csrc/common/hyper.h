// hyper.h: the columns of the fused optimizer step's hyperparameter table
// (one row of kHyper doubles per param group), defined once: the list below
// makes the enum (kLr, kBeta1, ..., kHyper) and the names, which the bindings
// export as pyreg._C.hyper_fields() and pyreg/backends/compiled.py checks
// against pyreg/backends/torch_ref.py's HYPER when it loads.
#pragma once

namespace pyreg {

// X(name, Name): the field's name in Python and its enum constant's suffix.
#define PYREG_HYPER_FIELDS(X)      \
  X(lr, Lr)                        \
  X(beta1, Beta1)                  \
  X(beta2, Beta2)                  \
  X(eps, Eps)                      \
  X(weight_decay, WeightDecay)     \
  X(momentum, Momentum)            \
  X(dampening, Dampening)          \
  X(lr_decay, LrDecay)             \
  X(alpha, Alpha)                  \
  X(l1, L1)                        \
  X(l2, L2)

enum HyperIndex : int {
#define PYREG_HYPER_ENUM(name, Name) k##Name,
  PYREG_HYPER_FIELDS(PYREG_HYPER_ENUM)
#undef PYREG_HYPER_ENUM
  kHyper  // the number of fields
};

// The fields' names, in order.
inline constexpr const char* kHyperNames[kHyper] = {
#define PYREG_HYPER_NAME(name, Name) #name,
    PYREG_HYPER_FIELDS(PYREG_HYPER_NAME)
#undef PYREG_HYPER_NAME
};

}  // namespace pyreg
