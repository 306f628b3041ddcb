"""The C library's enum values, by the names the bindings use, each defined here once.

Every module that passes one of these to C takes it from here (the error codes, SAE_OK and
SAE_E*, are defined once in _lib.py, beside LibsaeError). The values are sae.h's and never move
(API.md: new versions only add values).
"""
from __future__ import annotations

from typing import Dict

#: sae_arch: the architectures, as Model.arch names them (sae_arch_name), in the enum's order.
ARCHITECTURES: Dict[str, int] = {"relu": 1, "topk": 2, "batchtopk": 3, "jumprelu": 4,
                                 "gated": 5, "groupmax": 6}

#: sae_tensor: the tensors, by the names get_tensor and set_tensor take.
TENSORS: Dict[str, int] = {"W_enc": 1, "W_dec": 2, "b_enc": 3, "b_dec": 4, "threshold": 5,
                           "W_skip": 6, "r_mag": 7, "b_mag": 8}

#: sae_model_param: the model's parameters, by the names get_param and set_param take.
MODEL_PARAMS: Dict[str, int] = {"k": 1, "apply_b_dec_to_input": 2, "input_scale": 3,
                                "threshold": 4, "threads": 5, "bf16_weights": 6, "normalize": 7}

#: sae_normalize: the values of the "normalize" parameter (SAELens's normalize_activations).
NORMALIZATIONS: Dict[str, int] = {"none": 0, "layer_norm": 1, "constant_norm": 2}

#: sae_load_flag.
LOAD_FLAGS: Dict[str, int] = {"copy": 1}

#: sae_eval_metric: what Model.evaluate returns, by name.
EVAL_METRICS: Dict[str, int] = {"mse": 1, "fvu": 2, "explained_variance": 3, "l0": 4, "l1": 5,
                                "cosine": 6, "l2_ratio": 7, "dead_fraction": 8}

#: sae_steer_op: the kinds of op a steering plan holds.
STEER_OPS: Dict[str, int] = {"clamp": 1, "scale": 2, "add": 3}

#: sae_train_param: the trainer's parameters, by name.
TRAIN_PARAMS: Dict[str, int] = {"lr": 1, "l1_coeff": 2, "auxk": 3, "auxk_coeff": 4,
                                "dead_tokens": 5, "warmup_steps": 6, "beta1": 7, "beta2": 8,
                                "seed": 9, "total_steps": 10, "l1_warmup_steps": 11,
                                "lr_decay_steps": 12, "grad_clip": 13, "decoder_init_norm": 14,
                                "threshold_lr": 15, "adam_eps": 16, "normalize_input": 17,
                                "b_dec_init": 18}
TRAIN_PARAMS["bf16"] = 31  # SAE_TRAIN_BF16: mixed-precision products

#: sae_train_metric: what Trainer.step returns, by name.
TRAIN_METRICS: Dict[str, int] = {"loss": 1, "mse": 2, "fvu": 3, "l0": 4, "dead_fraction": 5,
                                 "steps": 6, "tokens": 7, "auxk_loss": 8, "lr": 9,
                                 "grad_norm": 10}
# JumpReLU and Matryoshka (sae.h: sae_train_param 19..21, sae_train_metric 11..13).
TRAIN_PARAMS.update({"jumprelu_bandwidth": 19, "jumprelu_init_threshold": 20, "l0_coeff": 21})
TRAIN_METRICS.update({"sparsity_loss": 11, "threshold_mean": 12, "prefix_fvu": 13})
# Diagnostics (held-out slice, warnings: sae.h sae_train_param 25, sae_train_metric 14..18).
TRAIN_PARAMS["heldout_every"] = 25
TRAIN_METRICS.update({"heldout_fvu": 14, "heldout_mse": 15, "heldout_l0": 16,
                      "heldout_step": 17, "warnings": 18})
#: sae_train_warning bits (Trainer.metrics()["warnings"]).
TRAIN_WARNINGS: Dict[str, int] = {"fvu": 1, "l0": 2}


def name_of(table: Dict[str, int], value: int):
    """The name of `value` in `table`, or the int itself when this package does not know it (a
    newer C library)."""
    for name, v in table.items():
        if v == value:
            return name
    return value
