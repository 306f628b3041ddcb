/*
 * sae-llama - find and steer the features of a llama2.c model with libsae.
 *
 *   sae-llama collect MODEL_DIR RUN_DIR   sample stories, save the residual stream at a layer
 *   sae-llama train RUN_DIR               train a TopK SAE on it, printing progress
 *   sae-llama browse RUN_DIR              write a static HTML feature browser
 *   sae-llama steer RUN_DIR               clamp a feature while generating; measure the effect
 *   sae-llama planted                     train on planted features (no model needed)
 *
 * `sae-llama COMMAND --help` lists a command's options. examples/demo runs them all.
 */
#include "sae_llama.h"

#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    int (*run)(int, char **);
    const char *what;
} commands[] = {
    {"collect", cmd_collect, "sample stories (or read --text) and save the residual stream"},
    {"train", cmd_train, "train an SAE on the collected activations"},
    {"browse", cmd_browse, "write an HTML feature browser"},
    {"steer", cmd_steer, "generate with a feature clamped, next to without, and measure"},
    {"planted", cmd_planted, "train on synthetic planted features and count those recovered"},
};

int main(int argc, char **argv)
{
    size_t n = sizeof commands / sizeof commands[0];
    if (argc >= 2) {
        for (size_t i = 0; i < n; i++)
            if (strcmp(argv[1], commands[i].name) == 0)
                return commands[i].run(argc - 1, argv + 1);
    }
    fprintf(stderr, "usage: sae-llama COMMAND [ARGS], COMMAND one of\n");
    for (size_t i = 0; i < n; i++)
        fprintf(stderr, "  %-8s %s\n", commands[i].name, commands[i].what);
    fprintf(stderr, "`sae-llama COMMAND --help` lists its options.\n");
    return 2;
}
