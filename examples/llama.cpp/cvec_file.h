/* cvec_file.h: load a control-vector GGUF into a llama.cpp context the way
 * `llama-cli --control-vector-scaled PATH STRENGTH --control-vector-layer-range
 * START END` does, through llama.cpp's own common_control_vector_load.
 * layer_start/layer_end <= 0 mean llama.cpp's defaults (1 and n_layer).
 * Returns 0, -1 if the file was refused (llama.cpp logs why), -2 if
 * llama_set_adapter_cvec refused it (wrong n_embd), -3 on a C++ exception. */
#ifndef LLCPP_CVEC_FILE_H
#define LLCPP_CVEC_FILE_H

#ifdef __cplusplus
extern "C" {
#endif

struct llama_context;
struct llama_model;

int llcpp_control_vector_apply(struct llama_context *ctx, const struct llama_model *model,
                               const char *path, float strength, int layer_start, int layer_end);

#ifdef __cplusplus
}
#endif
#endif
