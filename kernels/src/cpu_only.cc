// Built when CUDA is not: says so.
#include "kvstrata/kernels/quant.h"

namespace kvstrata::kernels {
bool BuiltWithCuda() { return false; }
}  // namespace kvstrata::kernels
