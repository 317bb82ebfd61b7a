# Decide whether CUDA kernels are built, enable the CUDA language, and find CUTLASS/CuTe headers
# from the PyPI package nvidia-cutlass (pinned in pyproject.toml / Makefile).
#   TOKENKERNELS_CUDA=AUTO : CUDA when nvcc is found AND the installed torch is a CUDA build
#   TOKENKERNELS_CUDA=ON   : CUDA required (error if nvcc or a CUDA torch is missing)
#   TOKENKERNELS_CUDA=OFF  : CPU only
# TOKENKERNELS_CUDA_CHECK=ON compiles the CUDA sources without needing a CUDA torch.
include(CheckLanguage)
set(TK_WITH_CUDA OFF)
set(_tk_need_cuda_lang OFF)
string(TOUPPER "${TOKENKERNELS_CUDA}" _tk_cuda_mode)
if(NOT _tk_cuda_mode STREQUAL "OFF" AND NOT _tk_cuda_mode STREQUAL "0")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER AND TK_TORCH_HAS_CUDA)
    set(TK_WITH_CUDA ON)
  elseif(_tk_cuda_mode STREQUAL "ON" OR _tk_cuda_mode STREQUAL "1")
    message(FATAL_ERROR "tokenkernels: TOKENKERNELS_CUDA=ON but nvcc found: '${CMAKE_CUDA_COMPILER}', "
                        "CUDA torch: ${TK_TORCH_HAS_CUDA}. For a GPU-less compile check use TOKENKERNELS_CUDA_CHECK=ON.")
  endif()
endif()
if(TK_WITH_CUDA OR TOKENKERNELS_CUDA_CHECK)
  set(_tk_need_cuda_lang ON)
endif()

add_library(tk_cutlass INTERFACE)
if(_tk_need_cuda_lang)
  if(NOT CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "${TOKENKERNELS_CUDA_ARCHS}")
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "tokenkernels: CUDA ${CUDAToolkit_VERSION}, archs ${TOKENKERNELS_CUDA_ARCHS}, with CUDA kernels in _C: ${TK_WITH_CUDA}")

  # CUTLASS/CuTe headers: the nvidia-cutlass wheel ships them in cutlass_library/source/include.
  # find_spec does not import the package (its import needs cuda-python, which we do not).
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c
      "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include') if s else '')"
    OUTPUT_VARIABLE TK_CUTLASS_INCLUDE OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT TK_CUTLASS_INCLUDE OR NOT EXISTS "${TK_CUTLASS_INCLUDE}/cute/tensor.hpp")
    message(FATAL_ERROR "tokenkernels: CUTLASS/CuTe headers not found. Install the pinned wheel: "
                        "pip install --no-deps nvidia-cutlass==4.2.0.0")
  endif()
  message(STATUS "tokenkernels: CUTLASS/CuTe headers at ${TK_CUTLASS_INCLUDE}")
  target_include_directories(tk_cutlass SYSTEM INTERFACE ${TK_CUTLASS_INCLUDE})
endif()
