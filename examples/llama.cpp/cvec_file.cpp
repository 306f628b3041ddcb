// cvec_file.cpp: llama.cpp's own control-vector file loader, callable from C.
//
// `llama-cli --control-vector FILE` (and --control-vector-scaled FILE S, and
// --control-vector-layer-range A B) goes through common_init_from_params in
// llama.cpp's common/common.cpp, which does exactly this:
//
//     if (layer_start <= 0) layer_start = 1;
//     if (layer_end   <= 0) layer_end   = llama_model_n_layer(model);
//     auto cvec = common_control_vector_load({{strength, fname}});
//     if (cvec.n_embd == -1) fail;
//     llama_set_adapter_cvec(ctx, cvec.data.data(), cvec.data.size(), cvec.n_embd,
//                            layer_start, layer_end);
//
// common_control_vector_load is C++ (std::vector, std::string) in libllama-common,
// so this file is the one C++ translation unit of the example; it calls the very
// same function, not a re-implementation of it.
#include "cvec_file.h"

#include "common.h"
#include "llama.h"

#include <exception>
#include <string>
#include <vector>

extern "C" int llcpp_control_vector_apply(struct llama_context *ctx, const struct llama_model *model,
                                          const char *path, float strength, int layer_start,
                                          int layer_end) {
    try {
        if (layer_start <= 0) layer_start = 1;
        if (layer_end <= 0) layer_end = llama_model_n_layer(model);
        std::vector<common_control_vector_load_info> infos;
        infos.push_back({strength, std::string(path)});
        const common_control_vector_data cvec = common_control_vector_load(infos);
        if (cvec.n_embd == -1) return -1;
        return llama_set_adapter_cvec(ctx, cvec.data.data(), cvec.data.size(), cvec.n_embd,
                                      layer_start, layer_end) == 0
                   ? 0
                   : -2;
    } catch (const std::exception &) {
        return -3;
    }
}
