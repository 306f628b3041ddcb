# Feature cards for sae-server (issue 18): included by examples/server/CMakeLists.txt after the
# llama.cpp example targets exist (add_subdirectory of examples/llama.cpp, which defines
# libsae_llama_cpp, llcpp_capture_io, sae_shared and LLAMA_CPP_INCLUDE_DIR / GGML_INCLUDE_DIR
# and the libraries' paths). Defines:
#   sae_server_features   static library: feature_cards.c (feature_cards.h), for the server to link
#   sae-server-stats      the statistics pass over a capture (stats.c)
#   sae-server-cards      tests/server/test_cards_dump.c: prints cards, the tests' driver
foreach(t libsae_llama_cpp llcpp_capture_io sae_shared)
  if(NOT TARGET ${t})
    message(FATAL_ERROR "cards.cmake needs the target ${t}: add examples/llama.cpp first")
  endif()
endforeach()
get_filename_component(_cards_dir "${CMAKE_CURRENT_LIST_FILE}" DIRECTORY)
get_filename_component(_cards_repo "${_cards_dir}/../.." ABSOLUTE)
get_filename_component(_cards_rpath "${LLAMA_CPP_LIBRARY}" DIRECTORY)
find_package(PkgConfig REQUIRED)
pkg_check_modules(CARDS_CJSON REQUIRED IMPORTED_TARGET libcjson)
set(_cards_warn -Wall -Wextra -Wpedantic -Wconversion)

add_library(sae_server_features STATIC "${_cards_dir}/feature_cards.c")
set_target_properties(sae_server_features PROPERTIES C_STANDARD 11 C_STANDARD_REQUIRED ON
                                                     C_EXTENSIONS OFF)
target_compile_options(sae_server_features PRIVATE ${_cards_warn})
target_include_directories(sae_server_features PUBLIC "${_cards_dir}")
target_link_libraries(sae_server_features PUBLIC libsae_llama_cpp sae_shared PkgConfig::CARDS_CJSON m)

add_executable(sae-server-stats "${_cards_dir}/stats.c")
set_target_properties(sae-server-stats PROPERTIES C_STANDARD 11 C_STANDARD_REQUIRED ON
                                                  C_EXTENSIONS OFF)
target_compile_options(sae-server-stats PRIVATE ${_cards_warn})
target_include_directories(sae-server-stats PRIVATE "${_cards_repo}/examples/llama.cpp")
target_link_libraries(sae-server-stats PRIVATE llcpp_capture_io sae_shared PkgConfig::CARDS_CJSON m)

add_executable(sae-server-cards "${_cards_repo}/tests/server/test_cards_dump.c")
set_target_properties(sae-server-cards PROPERTIES C_STANDARD 11 C_STANDARD_REQUIRED ON
                                                  C_EXTENSIONS OFF BUILD_RPATH "${_cards_rpath}")
target_compile_options(sae-server-cards PRIVATE ${_cards_warn})
find_package(Threads REQUIRED)
target_link_libraries(sae-server-cards PRIVATE sae_server_features Threads::Threads)
