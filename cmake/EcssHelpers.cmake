# Helpers that give every ECSS target the same shape: an ecss::NAME alias, the repository root
# as include directory (installed as include/ecss), warnings, and membership in the export set.

set(ECSS_WARNINGS -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wimplicit-fallthrough)
if(ECSS_WERROR)
  list(APPEND ECSS_WARNINGS -Werror)
endif()

# ecss_add_library(NAME SOURCES ... [PUBLIC_DEPS ...] [PRIVATE_DEPS ...])
# Creates the static library ecss_NAME with alias ecss::NAME.
function(ecss_add_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  set(target ecss_${name})
  add_library(${target} ${ARG_SOURCES})
  add_library(ecss::${name} ALIAS ${target})
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${name} OUTPUT_NAME ecss_${name})
  target_include_directories(${target} PUBLIC
    $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}>
    $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}/ecss>)
  target_compile_features(${target} PUBLIC cxx_std_17)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${ECSS_WARNINGS}>)
  target_link_libraries(${target} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  set_property(GLOBAL APPEND PROPERTY ECSS_LIBRARY_TARGETS ${target})
endfunction()

# ecss_install_headers(DIR HEADERS h...): installs the public headers of DIR (paths relative
# to DIR), keeping their paths, under include/ecss. Internal headers are listed nowhere and
# never installed; tests/install_consumer builds against what is, so a public header that
# includes an internal one fails CI.
function(ecss_install_headers dir)
  cmake_parse_arguments(ARG "" "" "HEADERS" ${ARGN})
  foreach(header ${ARG_HEADERS})
    get_filename_component(subdir ${header} DIRECTORY)
    install(FILES ${PROJECT_SOURCE_DIR}/${dir}/${header}
            DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/ecss/${dir}/${subdir})
  endforeach()
endfunction()

# ecss_add_test(NAME SOURCES ... [LIBS ...] LABEL label)
# One GoogleTest executable; each test case becomes a ctest test carrying LABEL. (One label per
# executable: gtest_discover_tests cannot pass a list-valued property through.)
function(ecss_add_test name)
  cmake_parse_arguments(ARG "" "LABEL" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_compile_options(${name} PRIVATE ${ECSS_WARNINGS})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gtest_main)
  gtest_discover_tests(${name}
    DISCOVERY_MODE PRE_TEST
    PROPERTIES LABELS ${ARG_LABEL})
endfunction()
