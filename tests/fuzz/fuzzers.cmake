# Included from tests/CMakeLists.txt: builds the libFuzzer harnesses with clang
# as an ExternalProject (tests/fuzz/CMakeLists.txt) and registers their ctest
# runs: a short smoke of each in the default suite (label fuzz), minutes of
# each with the opt-in label fuzz_long (excluded by the default test preset).
find_program(KVSTRATA_FUZZ_CXX NAMES clang++-14)
find_program(KVSTRATA_FUZZ_CC NAMES clang-14)
set(_fuzz_works OFF)
# A sanitized g++ build (the debug preset) would hand the harnesses a proto
# library instrumented for GCC's ASan runtime, not clang's.
if(KVSTRATA_FUZZ_CXX AND KVSTRATA_FUZZ_CC AND NOT CMAKE_CXX_FLAGS MATCHES "-fsanitize")
  set(_probe_dir ${CMAKE_BINARY_DIR}/fuzz-probe)
  file(MAKE_DIRECTORY ${_probe_dir})
  file(WRITE ${_probe_dir}/probe.cc
    "#include <cstddef>\n#include <cstdint>\n"
    "extern \"C\" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n")
  execute_process(
    COMMAND ${KVSTRATA_FUZZ_CXX} -fsanitize=fuzzer,address,undefined probe.cc -o probe
    WORKING_DIRECTORY ${_probe_dir} RESULT_VARIABLE _probe_result OUTPUT_QUIET ERROR_QUIET)
  if(_probe_result EQUAL 0)
    set(_fuzz_works ON)
  endif()
endif()
option(KVSTRATA_FUZZERS "Build the libFuzzer harnesses (needs clang-14 and libclang-rt-14-dev)" ${_fuzz_works})
if(NOT KVSTRATA_FUZZERS)
  message(STATUS "kvstrata: fuzzers off (clang++-14 with -fsanitize=fuzzer not found)")
  return()
endif()

include(ExternalProject)
set(KVSTRATA_FUZZ_DIR ${CMAKE_BINARY_DIR}/fuzz)
set(_fuzz_launcher "")
if(CCACHE_PROGRAM)
  set(_fuzz_launcher -DCMAKE_CXX_COMPILER_LAUNCHER=${CCACHE_PROGRAM} -DCMAKE_C_COMPILER_LAUNCHER=${CCACHE_PROGRAM})
endif()
# Built by `all`, so ctest finds the harnesses; a rebuild with nothing changed
# is one no-op ninja run.
ExternalProject_Add(kvstrata_fuzzers
  SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/fuzz
  BINARY_DIR ${KVSTRATA_FUZZ_DIR}
  CMAKE_GENERATOR Ninja
  CMAKE_ARGS -DCMAKE_CXX_COMPILER=${KVSTRATA_FUZZ_CXX} -DCMAKE_C_COMPILER=${KVSTRATA_FUZZ_CC}
             -DKVSTRATA_PROTO_LIBRARY=$<TARGET_FILE:kvstrata_proto>
             -DKVSTRATA_PROTO_INCLUDE_DIR=${CMAKE_BINARY_DIR}/proto ${_fuzz_launcher}
  BUILD_ALWAYS ON
  INSTALL_COMMAND ""
  DEPENDS kvstrata_proto)

set(KVSTRATA_FUZZ_HARNESSES block_key namespace_spec index_record stored_format trace node_rpc
    fast_path_wire fast_path)
set(_run ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/run_fuzzer.sh)
foreach(h ${KVSTRATA_FUZZ_HARNESSES})
  set(_args ${KVSTRATA_FUZZ_DIR}/fuzz_${h} ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/corpus/${h}
            ${KVSTRATA_FUZZ_DIR}/scratch)
  add_test(NAME fuzz_${h} COMMAND ${_run} ${_args} 5)
  set_tests_properties(fuzz_${h} PROPERTIES LABELS fuzz TIMEOUT 120)
  add_test(NAME long_fuzz_${h} COMMAND ${_run} ${_args} 300)
  set_tests_properties(long_fuzz_${h} PROPERTIES LABELS fuzz_long TIMEOUT 900)
endforeach()
