# CUDA is optional: KVSTRATA_CUDA=AUTO enables it when a CUDA compiler is
# found. Sets KVSTRATA_HAVE_CUDA. Shared by the root build and the standalone
# kernels/ build (which must not need anything outside kernels/).
set(KVSTRATA_CUDA AUTO CACHE STRING "Build CUDA code: AUTO, ON or OFF")
set_property(CACHE KVSTRATA_CUDA PROPERTY STRINGS AUTO ON OFF)
set(KVSTRATA_HAVE_CUDA OFF)
if(NOT KVSTRATA_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    set(KVSTRATA_HAVE_CUDA ON)
  elseif(KVSTRATA_CUDA STREQUAL "ON")
    message(FATAL_ERROR "KVSTRATA_CUDA=ON but no CUDA compiler was found")
  endif()
endif()
