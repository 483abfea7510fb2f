# FindNCCL
# --------
# Finds the NVIDIA Collective Communications Library.
#
# Search hints, in order: NCCL_ROOT (CMake variable or environment variable), NCCL_INCLUDE_DIR /
# NCCL_LIBRARY (cache variables, to point at exact files), the CUDA toolkit found by
# find_package(CUDAToolkit) (CUDAToolkit_INCLUDE_DIRS, CUDAToolkit_LIBRARY_DIR), then the
# system default paths (Debian's libnccl-dev installs into /usr).
#
# Set NCCL_USE_STATIC=ON to prefer libnccl_static.a.
#
# Result variables:
#   NCCL_FOUND, NCCL_VERSION (e.g. 2.28.9), NCCL_VERSION_MAJOR/MINOR/PATCH,
#   NCCL_INCLUDE_DIRS, NCCL_LIBRARIES
# Imported target:
#   NCCL::NCCL
include(FindPackageHandleStandardArgs)

set(_nccl_include_hints "")
set(_nccl_library_hints "")
foreach(_nccl_root IN ITEMS "${NCCL_ROOT}" "$ENV{NCCL_ROOT}")
  if(_nccl_root)
    list(APPEND _nccl_include_hints "${_nccl_root}/include")
    list(APPEND _nccl_library_hints "${_nccl_root}/lib" "${_nccl_root}/lib64")
  endif()
endforeach()
if(CUDAToolkit_INCLUDE_DIRS)
  list(APPEND _nccl_include_hints ${CUDAToolkit_INCLUDE_DIRS})
endif()
if(CUDAToolkit_LIBRARY_DIR)
  list(APPEND _nccl_library_hints "${CUDAToolkit_LIBRARY_DIR}")
endif()
if(CUDAToolkit_LIBRARY_ROOT)
  list(APPEND _nccl_include_hints "${CUDAToolkit_LIBRARY_ROOT}/include")
  list(APPEND _nccl_library_hints "${CUDAToolkit_LIBRARY_ROOT}/lib" "${CUDAToolkit_LIBRARY_ROOT}/lib64")
endif()

find_path(NCCL_INCLUDE_DIR NAMES nccl.h
  HINTS ${_nccl_include_hints}
  DOC "Directory that contains nccl.h")

if(NCCL_USE_STATIC)
  set(_nccl_names nccl_static nccl)
else()
  set(_nccl_names nccl nccl_static)
endif()
find_library(NCCL_LIBRARY NAMES ${_nccl_names}
  HINTS ${_nccl_library_hints}
  PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu
  DOC "The NCCL library (libnccl.so or libnccl_static.a)")

unset(NCCL_VERSION)
if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _nccl_version_lines
       REGEX "^#define[ \t]+NCCL_(MAJOR|MINOR|PATCH)[ \t]+[0-9]+")
  foreach(_part MAJOR MINOR PATCH)
    set(NCCL_VERSION_${_part} "")
    foreach(_line IN LISTS _nccl_version_lines)
      if(_line MATCHES "^#define[ \t]+NCCL_${_part}[ \t]+([0-9]+)")
        set(NCCL_VERSION_${_part} "${CMAKE_MATCH_1}")
      endif()
    endforeach()
  endforeach()
  if(NOT NCCL_VERSION_MAJOR STREQUAL "" AND NOT NCCL_VERSION_MINOR STREQUAL ""
     AND NOT NCCL_VERSION_PATCH STREQUAL "")
    set(NCCL_VERSION "${NCCL_VERSION_MAJOR}.${NCCL_VERSION_MINOR}.${NCCL_VERSION_PATCH}")
  endif()
  unset(_nccl_version_lines)
endif()

find_package_handle_standard_args(NCCL
  REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR
  VERSION_VAR NCCL_VERSION)

if(NCCL_FOUND)
  set(NCCL_INCLUDE_DIRS "${NCCL_INCLUDE_DIR}")
  set(NCCL_LIBRARIES "${NCCL_LIBRARY}")
  if(NOT TARGET NCCL::NCCL)
    add_library(NCCL::NCCL UNKNOWN IMPORTED)
    set_target_properties(NCCL::NCCL PROPERTIES
      IMPORTED_LOCATION "${NCCL_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
    if(TARGET CUDA::cudart)
      set_property(TARGET NCCL::NCCL APPEND PROPERTY INTERFACE_LINK_LIBRARIES CUDA::cudart)
    endif()
  endif()
endif()

mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)
unset(_nccl_include_hints)
unset(_nccl_library_hints)
unset(_nccl_names)
unset(_nccl_root)
unset(_part)
