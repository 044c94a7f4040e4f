// The CPU row loops for any processor of the target architecture.
#define KVQ_CPU_VARIANT generic
#include "quant_cpu_impl.h"
