# Locate the installed torch through the Python interpreter (not TorchConfig.cmake, whose CUDA
# branch drags in cuDNN/NVTX discovery we do not need) and describe it as interface targets:
#   tk_torch       headers, c10 + torch_cpu + torch, the C++ ABI flag
#   tk_torch_cuda  torch_cuda + c10_cuda (only when the installed torch is a CUDA build)
# Sets TK_TORCH_LIB_DIR, TK_TORCH_HAS_CUDA, TK_TORCH_VERSION.
find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND ${Python3_EXECUTABLE} -c
    "import os, torch; from torch.utils import cpp_extension as c; print('|'.join(c.include_paths())); print(os.path.join(os.path.dirname(torch.__file__), 'lib')); print(int(torch.compiled_with_cxx11_abi())); print(torch.version.cuda or ''); print(torch.__version__)"
  OUTPUT_VARIABLE _tk_torch_out
  RESULT_VARIABLE _tk_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _tk_torch_rc EQUAL 0)
  message(FATAL_ERROR "tokenkernels: `import torch` failed with ${Python3_EXECUTABLE}; install torch first (make test / make bench do)")
endif()
string(REPLACE "\n" ";" _tk_torch_lines "${_tk_torch_out}")
list(GET _tk_torch_lines 0 _tk_inc)
list(GET _tk_torch_lines 1 TK_TORCH_LIB_DIR)
list(GET _tk_torch_lines 2 _tk_abi)
list(GET _tk_torch_lines 3 _tk_cuda_ver)
list(GET _tk_torch_lines 4 TK_TORCH_VERSION)
string(REPLACE "|" ";" _tk_inc "${_tk_inc}")
if(_tk_cuda_ver STREQUAL "")
  set(TK_TORCH_HAS_CUDA OFF)
else()
  set(TK_TORCH_HAS_CUDA ON)
endif()
message(STATUS "tokenkernels: torch ${TK_TORCH_VERSION} (CUDA: ${TK_TORCH_HAS_CUDA} ${_tk_cuda_ver}) at ${TK_TORCH_LIB_DIR}")

add_library(tk_torch INTERFACE)
target_include_directories(tk_torch SYSTEM INTERFACE ${_tk_inc})
target_compile_definitions(tk_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_tk_abi})
foreach(_lib c10 torch_cpu torch)
  find_library(TK_LIB_${_lib} NAMES ${_lib} PATHS ${TK_TORCH_LIB_DIR} NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(tk_torch INTERFACE ${TK_LIB_${_lib}})
endforeach()

# at::parallel_for is header-inline: without OpenMP on *our* objects it silently runs serially.
# torch's CPU build uses OpenMP (libgomp ships in torch/lib and is loaded before us).
find_package(OpenMP COMPONENTS CXX)
if(OpenMP_CXX_FOUND)
  target_link_libraries(tk_torch INTERFACE OpenMP::OpenMP_CXX)
else()
  message(WARNING "tokenkernels: no OpenMP for the C++ compiler; CPU kernels will run single-threaded")
endif()

add_library(tk_torch_cuda INTERFACE)
if(TK_TORCH_HAS_CUDA)
  foreach(_lib c10_cuda torch_cuda)
    find_library(TK_LIB_${_lib} NAMES ${_lib} PATHS ${TK_TORCH_LIB_DIR} NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(tk_torch_cuda INTERFACE ${TK_LIB_${_lib}})
  endforeach()
endif()
