// The CPU row loops for x86-64 processors with AVX2 and F16C (built with
// -mavx2 -mf16c and without -mfma: same bytes as the generic variant).
#define KVQ_CPU_VARIANT avx2
#include "quant_cpu_impl.h"
