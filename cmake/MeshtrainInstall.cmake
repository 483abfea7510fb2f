# Install rules and the CMake package: find_package(meshtrain CONFIG) → meshtrain::meshtrain.
#
# Installed: the meshtrain library, the public headers include/meshtrain/*.h (never lib/
# internals), and lib/cmake/meshtrain/{meshtrainConfig,meshtrainConfigVersion,meshtrainTargets};
# with the torch glue also meshtrain_torch and meshtrainTorchTargets (component "torch").
# The package is relocatable: every path in it is relative to the installed config file.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(MESHTRAIN_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/meshtrain"
    CACHE STRING "Where meshtrainConfig.cmake is installed, relative to the prefix")
mark_as_advanced(MESHTRAIN_INSTALL_CMAKEDIR)

# A library and its export set (meshtrainTargets, meshtrainTorchTargets).
function(_meshtrain_install_library target export_set)
  install(TARGETS ${target}
    EXPORT ${export_set}
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT runtime NAMELINK_COMPONENT dev
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dev
    RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT runtime)
endfunction()
_meshtrain_install_library(meshtrain meshtrainTargets)

# The torch glue (lib/torch), when built: its own export set, loaded by the config only for
# find_package(meshtrain COMPONENTS torch), so that consumers without torch never need it.
set(_meshtrain_header_excludes "")
if(MESHTRAIN_HAVE_TORCH)
  _meshtrain_install_library(meshtrain_torch meshtrainTorchTargets)
  install(EXPORT meshtrainTorchTargets
    NAMESPACE meshtrain::
    FILE meshtrainTorchTargets.cmake
    DESTINATION ${MESHTRAIN_INSTALL_CMAKEDIR}
    COMPONENT dev)
else()
  set(_meshtrain_header_excludes PATTERN "torch.h" EXCLUDE)  # a header without its library
endif()

# The library target's INSTALL_INTERFACE include directory is "include": keep them in step.
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/meshtrain
  DESTINATION include
  COMPONENT dev
  FILES_MATCHING PATTERN "*.h" ${_meshtrain_header_excludes})
unset(_meshtrain_header_excludes)

install(EXPORT meshtrainTargets
  NAMESPACE meshtrain::
  FILE meshtrainTargets.cmake
  DESTINATION ${MESHTRAIN_INSTALL_CMAKEDIR}
  COMPONENT dev)

# What the config file must find for the consumer. A shared meshtrain hides its PRIVATE
# dependencies (OpenSSL, Cap'n Proto, ZeroMQ, the CUDA runtime); a static one passes them on
# as link-only dependencies, so then the config must find them too.
get_target_property(_meshtrain_type meshtrain TYPE)
if(_meshtrain_type STREQUAL "STATIC_LIBRARY")
  set(MESHTRAIN_PACKAGE_STATIC ON)
else()
  set(MESHTRAIN_PACKAGE_STATIC OFF)
endif()
unset(_meshtrain_type)
set(MESHTRAIN_PACKAGE_WITH_CUDA ${MESHTRAIN_HAVE_CUDA})
set(MESHTRAIN_PACKAGE_WITH_TORCH ${MESHTRAIN_HAVE_TORCH})

configure_package_config_file(
  ${CMAKE_CURRENT_LIST_DIR}/meshtrainConfig.cmake.in
  ${PROJECT_BINARY_DIR}/meshtrainConfig.cmake
  INSTALL_DESTINATION ${MESHTRAIN_INSTALL_CMAKEDIR})
# 0.x: a minor release may break the API, so only the same minor version is compatible.
write_basic_package_version_file(
  ${PROJECT_BINARY_DIR}/meshtrainConfigVersion.cmake
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion)
install(FILES
  ${PROJECT_BINARY_DIR}/meshtrainConfig.cmake
  ${PROJECT_BINARY_DIR}/meshtrainConfigVersion.cmake
  DESTINATION ${MESHTRAIN_INSTALL_CMAKEDIR}
  COMPONENT dev)
