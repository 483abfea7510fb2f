# cmake -P script behind the install_consumer test. Inputs (-D): BUILD_DIR, CONSUMER_SOURCE_DIR,
# WORK_DIR, CONFIG, GENERATOR, C_COMPILER, CXX_COMPILER, SANITIZE (comma-separated, may be empty),
# TORCH_DIR (the build's Torch_DIR when it built the torch glue, else empty).
cmake_minimum_required(VERSION 3.24)

foreach(var BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR)
  if(NOT ${var})
    message(FATAL_ERROR "consumer_test.cmake: -D${var}=... is required")
  endif()
endforeach()

function(run_step name)
  message(STATUS "install_consumer: ${name}: ${ARGN}")
  execute_process(COMMAND ${ARGN}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install_consumer: ${name} failed (${rc})\n--- stdout\n${out}\n--- stderr\n${err}")
  endif()
  set(step_output "${out}${err}" PARENT_SCOPE)
endfunction()

# Start clean: nothing from an earlier run may satisfy this one.
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
set(relocated "${WORK_DIR}/moved/elsewhere/meshtrain")

set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()

# 1. Install.
run_step("install" "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}" ${config_args})

# Only the public headers: include/meshtrain/*.h, nothing from lib/.
file(GLOB_RECURSE installed_headers RELATIVE "${prefix}/include" "${prefix}/include/*")
if(NOT installed_headers)
  message(FATAL_ERROR "install_consumer: no headers installed under ${prefix}/include")
endif()
foreach(h IN LISTS installed_headers)
  if(NOT h MATCHES "^meshtrain/[A-Za-z0-9_]+\\.h$")
    message(FATAL_ERROR "install_consumer: unexpected installed header include/${h} "
                        "(only include/meshtrain/*.h is public)")
  endif()
endforeach()
file(GLOB_RECURSE config_files "${prefix}/*meshtrainConfig.cmake")
if(NOT config_files)
  message(FATAL_ERROR "install_consumer: meshtrainConfig.cmake was not installed under ${prefix}")
endif()

# 2. Relocate: move the whole prefix; the old path must no longer exist, and the package files
#    must not mention it.
file(MAKE_DIRECTORY "${WORK_DIR}/moved/elsewhere")
file(RENAME "${prefix}" "${relocated}")
if(EXISTS "${prefix}")
  message(FATAL_ERROR "install_consumer: ${prefix} still exists after the move")
endif()
file(GLOB_RECURSE package_files "${relocated}/*.cmake")
foreach(f IN LISTS package_files)
  file(READ "${f}" text)
  string(FIND "${text}" "${prefix}" at)
  if(NOT at EQUAL -1)
    message(FATAL_ERROR "install_consumer: ${f} hard-codes the install prefix ${prefix}: not relocatable")
  endif()
endforeach()

# 3. Configure and build the consumer against the relocated prefix only.
set(consumer_build "${WORK_DIR}/consumer-build")
set(configure_args -S "${CONSUMER_SOURCE_DIR}" -B "${consumer_build}"
    "-DCMAKE_PREFIX_PATH=${relocated}"
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(GENERATOR)
  list(APPEND configure_args -G "${GENERATOR}")
endif()
if(C_COMPILER)
  list(APPEND configure_args "-DCMAKE_C_COMPILER=${C_COMPILER}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(CONFIG)
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${CONFIG}")
endif()
if(TORCH_DIR)
  list(APPEND configure_args -DMESHTRAIN_CONSUMER_TORCH=ON "-DTorch_DIR=${TORCH_DIR}")
endif()
if(SANITIZE)
  # A sanitized libmeshtrain needs the sanitizer runtime in the program that loads it.
  list(APPEND configure_args "-DCMAKE_CXX_FLAGS=-fsanitize=${SANITIZE}"
       "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=${SANITIZE}")
endif()
run_step("configure consumer" "${CMAKE_COMMAND}" ${configure_args})
string(FIND "${step_output}" "${relocated}" found_at)
if(found_at EQUAL -1)
  message(FATAL_ERROR "install_consumer: the consumer did not find meshtrain under ${relocated}:\n${step_output}")
endif()
run_step("build consumer" "${CMAKE_COMMAND}" --build "${consumer_build}" ${config_args})

# 4. Run it.
set(exe "${consumer_build}/meshtrain_consumer")
if(CONFIG AND NOT EXISTS "${exe}" AND EXISTS "${consumer_build}/${CONFIG}/meshtrain_consumer")
  set(exe "${consumer_build}/${CONFIG}/meshtrain_consumer")
endif()
run_step("run consumer" "${exe}")
if(NOT step_output MATCHES "fingerprint [0-9a-f]+")
  message(FATAL_ERROR "install_consumer: consumer output has no fingerprint:\n${step_output}")
endif()
set(consumer_output "${step_output}")
if(TORCH_DIR)
  run_step("run torch consumer" "${consumer_build}/meshtrain_torch_consumer")
  if(NOT step_output MATCHES "restored step 1: weights match")
    message(FATAL_ERROR "install_consumer: unexpected torch consumer output:\n${step_output}")
  endif()
  string(APPEND consumer_output "${step_output}")
endif()
message(STATUS "install_consumer: OK\n${consumer_output}")
