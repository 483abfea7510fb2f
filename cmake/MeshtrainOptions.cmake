# Sanitizers and CUDA detection, shared by every target.
if(MESHTRAIN_SANITIZE)
  foreach(s IN LISTS MESHTRAIN_SANITIZE)
    if(NOT s MATCHES "^(address|undefined|thread|leak)$")
      message(FATAL_ERROR "MESHTRAIN_SANITIZE: unknown sanitizer '${s}' (address, undefined, thread, leak)")
    endif()
  endforeach()
  list(JOIN MESHTRAIN_SANITIZE "," _meshtrain_san)
  # C and C++ only: nvcc does not accept -fsanitize (CUDA sources are host-sanitized through
  # the C++ code that calls them).
  add_compile_options(
    "$<$<COMPILE_LANGUAGE:C,CXX>:-fsanitize=${_meshtrain_san};-fno-omit-frame-pointer;-fno-sanitize-recover=all>")
  add_link_options(-fsanitize=${_meshtrain_san})
endif()

if(NOT MESHTRAIN_CUDA MATCHES "^(AUTO|ON|OFF|SIM)$")
  message(FATAL_ERROR "MESHTRAIN_CUDA must be AUTO, ON, OFF or SIM, not '${MESHTRAIN_CUDA}'")
endif()
set(MESHTRAIN_HAVE_CUDA OFF)
# SIM: no CUDA; the kernels and every CUDA path run on a simulated device (device memory is host
# memory, kernels run through tests/support/cuda_sim.h), so that their host side is tested in
# CI without a GPU. For tests only: nothing in such a build touches a GPU.
set(MESHTRAIN_SIM_DEVICE OFF)
if(MESHTRAIN_CUDA STREQUAL "SIM")
  set(MESHTRAIN_SIM_DEVICE ON)
  # Torch's CUDA tensors are real device memory, which the simulated device would memmove.
  if(MESHTRAIN_TORCH STREQUAL "ON")
    message(FATAL_ERROR "MESHTRAIN_CUDA=SIM builds no torch glue: set MESHTRAIN_TORCH=OFF (or AUTO)")
  endif()
  set(MESHTRAIN_TORCH OFF)
  message(STATUS "meshtrain: CUDA kernels on a simulated device (MESHTRAIN_CUDA=SIM; tests only)")
elseif(NOT MESHTRAIN_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      # Ampere and Hopper: the GPUs DePIN providers rent most. Override on the command line.
      set(CMAKE_CUDA_ARCHITECTURES 80 90)
    endif()
    enable_language(CUDA)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    find_package(CUDAToolkit REQUIRED)
    find_package(NCCL)
    set(MESHTRAIN_HAVE_CUDA ON)
  elseif(MESHTRAIN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MESHTRAIN_CUDA=ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER or PATH)")
  endif()
endif()
message(STATUS "meshtrain: CUDA kernels ${MESHTRAIN_HAVE_CUDA}")

# The torch glue (lib/torch, target meshtrain_torch) is the only code that includes torch
# headers; meshtrain itself never links torch.
if(NOT MESHTRAIN_TORCH MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MESHTRAIN_TORCH must be AUTO, ON or OFF, not '${MESHTRAIN_TORCH}'")
endif()
# Torch's config sets variables meant for its own build (CUDA flags, ...), which must not reach
# meshtrain's CUDA code: find it inside a function, whose variables stay local. Its imported
# targets are directory-scoped and remain. A CUDA torch's config compiles CUDA test programs in
# CMAKE_CUDA_STANDARD, defaulting to the C++ standard (20), which nvcc may refuse: C++17 here,
# as for meshtrain's kernels.
function(_meshtrain_find_torch)
  if(NOT CMAKE_CUDA_STANDARD)
    set(CMAKE_CUDA_STANDARD 17)
  endif()
  find_package(Torch QUIET)
  set(MESHTRAIN_HAVE_TORCH ${Torch_FOUND} PARENT_SCOPE)
  set(MESHTRAIN_TORCH_VERSION "${Torch_VERSION}" PARENT_SCOPE)
endfunction()
set(MESHTRAIN_HAVE_TORCH OFF)
if(NOT MESHTRAIN_TORCH STREQUAL "OFF")
  _meshtrain_find_torch()
  if(NOT MESHTRAIN_HAVE_TORCH)
    set(MESHTRAIN_HAVE_TORCH OFF)
    if(MESHTRAIN_TORCH STREQUAL "ON")
      message(FATAL_ERROR "MESHTRAIN_TORCH=ON but find_package(Torch) failed: install libtorch-dev, or point "
                          "CMAKE_PREFIX_PATH at a torch 2.x (python -c 'import torch;print(torch.utils.cmake_prefix_path)')")
    endif()
  endif()
endif()
if(MESHTRAIN_HAVE_TORCH)
  message(STATUS "meshtrain: torch glue ON (torch ${MESHTRAIN_TORCH_VERSION}, ${Torch_DIR})")
else()
  message(STATUS "meshtrain: torch glue OFF")
endif()
