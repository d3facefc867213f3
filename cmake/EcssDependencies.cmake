# Finds every third-party dependency in one place. Each is a real library from the system
# (Debian packages, or the CUDA toolkit); nothing is vendored. scripts/install-deps.sh installs
# the Debian ones.

list(APPEND CMAKE_MODULE_PATH "${CMAKE_CURRENT_LIST_DIR}")

find_package(Threads REQUIRED)
find_package(TBB CONFIG REQUIRED)          # optimizer/ task arenas
find_package(Liburing REQUIRED)            # offload/io NVMe engine
find_package(OpenBLAS REQUIRED)            # kernels/cpu GEMMs

if(ECSS_JEMALLOC)
  find_package(Jemalloc REQUIRED)          # host-tier allocator (runtime/device/host_allocator)
endif()

if(ECSS_BUILD_TESTS)
  find_package(GTest CONFIG REQUIRED)
endif()
# ecss-plan reads its model, hardware and workload files; tests parse the JSON the project
# writes; ecss-bench parses fio's.
find_package(nlohmann_json CONFIG REQUIRED)
if(ECSS_BUILD_BENCH)
  find_package(benchmark CONFIG REQUIRED)
endif()

# CUDA: ECSS_CUDA=AUTO builds the CUDA backend when the toolkit is found, ON requires it,
# OFF never builds it. NCCL is looked for beside the toolkit.
set(ECSS_HAVE_CUDA OFF)
set(ECSS_HAVE_NCCL OFF)
if(NOT ECSS_CUDA STREQUAL "OFF")
  if(NOT DEFINED CUDAToolkit_ROOT AND EXISTS "/usr/local/cuda")
    set(CUDAToolkit_ROOT "/usr/local/cuda")
  endif()
  if(ECSS_CUDA STREQUAL "ON")
    find_package(CUDAToolkit REQUIRED)
  else()
    find_package(CUDAToolkit QUIET)
  endif()
  if(CUDAToolkit_FOUND)
    set(ECSS_HAVE_CUDA ON)
    # kernels/cuda is compiled by nvcc; default architectures: A100 and H100.
    if(NOT DEFINED CMAKE_CUDA_COMPILER)
      set(CMAKE_CUDA_COMPILER "${CUDAToolkit_NVCC_EXECUTABLE}")
    endif()
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 80 90)
    endif()
    if(ECSS_CCACHE AND NOT CMAKE_CUDA_COMPILER_LAUNCHER)
      set(CMAKE_CUDA_COMPILER_LAUNCHER ${ECSS_CCACHE})
    endif()
    enable_language(CUDA)
    find_package(NCCL QUIET)
    if(NCCL_FOUND)
      set(ECSS_HAVE_NCCL ON)
    elseif(ECSS_CUDA STREQUAL "ON")
      message(FATAL_ERROR "ECSS_CUDA=ON but NCCL was not found (set NCCL_ROOT)")
    endif()
  endif()
endif()

message(STATUS "ECSS: CUDA backend ${ECSS_HAVE_CUDA} (toolkit ${CUDAToolkit_VERSION}), "
               "NCCL ${ECSS_HAVE_NCCL}, jemalloc ${ECSS_JEMALLOC}, sanitize '${ECSS_SANITIZE}'")
