"""python3 -m libsae: what people do with SAE files every day, without writing code.

    python3 -m libsae info FILE                       describe a model (SAE or transcoder)
    python3 -m libsae convert IN OUT                  any loadable format -> libsae's file
    python3 -m libsae top FILE ACTS.npy [-k 8]        each token's strongest features
    python3 -m libsae evaluate FILE ACTS.npy [--target Y.npy]   reconstruction quality
    python3 -m libsae train ACTS.npy OUT [options]    train an SAE (--target Y.npy: a
                                                      transcoder), with a progress bar
    python3 -m libsae steer FILE ACTS.npy [--target Y.npy] --clamp F=V ... -o OUT.npy

A transcoder reads ACTS.npy (an MLP's input, [tokens, d_in]) and predicts the MLP's output:
evaluate scores it against --target Y.npy ([tokens, d_out]), and steer changes Y.npy (the
features read from ACTS.npy) and writes it; both refuse a transcoder without --target.

Exit status: 0 on success, 2 for a wrong command line, 1 when the library or a file refuses
(the message goes to stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from typing import List, Optional, Sequence, Tuple

from . import HAVE_NUMPY, TENSORS, LibsaeError, Model, NpyFile, Steering, Trainer, has, save_npy
from . import _buffers as B
from ._lib import version_string

PROG = "python3 -m libsae"


class CliError(Exception):
    """A failure that is the input's fault, reported as 'libsae: error: ...' with exit 1."""


# ------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------

def _summary(values) -> Tuple[float, float, float]:
    """min, mean, max of a float array (numpy or array.array)."""
    if HAVE_NUMPY:
        a = B.np.asarray(values, dtype=B.np.float64)
        return float(a.min()), float(a.mean()), float(a.max())
    vals = list(values)
    return min(vals), math.fsum(vals) / len(vals), max(vals)


def _kind(m: Model) -> str:
    if not m.is_transcoder:
        return "SAE"
    skip = "with" if m.has_tensor("W_skip") else "without"
    return f"transcoder {skip} skip connection"


# How each PyTorch layout was read (docs/formats.md, "PyTorch state dicts"): the rules that are
# not visible in the parameters the model reports.
_READ_AS = {
    "dictionary_learning/AutoEncoder":
        "encoder.weight.T, encoder.bias, decoder.weight.T, bias (b_dec, subtracted first); "
        "decoder columns normalized at load as from_pretrained(normalize_decoder=True)",
    "dictionary_learning/AutoEncoderNew":
        "encoder.weight.T, encoder.bias, decoder.weight.T, decoder.bias (not subtracted)",
    "dictionary_learning/AutoEncoderTopK":
        "k from the file (config.json trainer.k must agree); per-token top k of the ReLU "
        "(encode's default use_threshold=False: the threshold buffer is not used)",
    "dictionary_learning/BatchTopKSAE":
        "the file's global threshold (encode's default use_threshold=True); k kept, unused at "
        "inference; config.json trainer.dict_class told it from AutoEncoderTopK",
    "dictionary_learning/JumpReluAutoEncoder":
        "W_enc, b_enc, W_dec, b_dec, threshold; b_dec not subtracted (apply_b_dec_to_input "
        "False, as from_pretrained)",
    "dictionary_learning/GatedAutoEncoder":
        "encoder.weight.T, gate_bias, r_mag, mag_bias, decoder.weight.T, decoder_bias",
    "dictionary_learning/MatryoshkaBatchTopKSAE":
        "the file's global threshold; group_sizes checked to sum to d_sae, every group active",
    "openai/Autoencoder":
        "pre_bias, encoder.weight.T, latent_bias, decoder.weight.T; activation (and k from "
        "activation_state_dict or activation.k); TopK turns on their LN (layer_norm); "
        "stats buffers ignored",
    "goodfire/SparseAutoEncoder":
        "encoder_linear, decoder_linear (ReLU, decoder bias not subtracted)",
    "llama-scope-r1":
        "encoder.weight.T (or W_E), encoder.bias, decoder.weight.T (or W_D), decoder.bias; "
        "threshold exp(log_jumprelu_threshold) / ||W_D row|| (sparsity_include_decoder_norm); "
        "input_scale sqrt(d_model) / dataset_average_activation_norm (dataset-wise)",
    "goodfire/BatchTopKTiedSAE":
        "W (encoder) and W.T (decoder), b_enc, b_dec; k from config.json or the release "
        "folder (math 128, logic 64); batch top k run per token",
}


def cmd_info(args) -> int:
    m = Model.load(args.file)
    norms = m.decoder_norms()  # the norms the library keeps, not recomputed here
    lo, mean, hi = _summary(norms)
    off_unit = sum(1 for v in norms if abs(v - 1.0) > 1e-3)
    params = m.params()
    held = [name for name in TENSORS if m.has_tensor(name)]
    per_feature = [name for name in ("threshold", "r_mag", "b_mag") if name in held]
    if args.json:
        import json
        out = {"file": str(args.file), "format": m.format, "architecture": m.arch,
               "kind": "transcoder" if m.is_transcoder else "sae",
               "skip": m.has_tensor("W_skip"), "d_in": m.d_in, "d_sae": m.d_sae,
               "d_out": m.d_out, "dtype": m.dtype, "normalize": params.get("normalize"),
               "read_as": _READ_AS.get(m.format),
               "parameters": params, "tensors": {n: list(m.tensor_shape(n)) for n in held},
               "decoder_row_norms": {"min": lo, "mean": mean, "max": hi,
                                     "not_unit": off_unit}}
        for name in per_feature:
            tlo, tmean, thi = _summary(m.get_tensor(name))
            out[name] = {"min": tlo, "mean": tmean, "max": thi}
        print(json.dumps(out, indent=2))
        return 0
    shapes = ", ".join(f"{n} [{', '.join(map(str, m.tensor_shape(n)))}]" for n in held
                       if n in ("W_enc", "W_dec", "W_skip"))
    print(f"file          {args.file}")
    print(f"format        {m.format}")
    if m.format in _READ_AS:
        print(f"read as       {_READ_AS[m.format]}")
    print(f"kind          {_kind(m)}")
    print(f"architecture  {m.arch}")
    print(f"shape         d_in {m.d_in}, d_sae {m.d_sae}, d_out {m.d_out} ({shapes})")
    print(f"dtype         {m.dtype}")
    print(f"normalize     {params.get('normalize', 'none')}")
    print("parameters    " + ", ".join(f"{k} {_num(v)}" for k, v in params.items()))
    print(f"W_dec rows    norm min {lo:.6g}, mean {mean:.6g}, max {hi:.6g}; "
          f"{off_unit} of {m.d_sae} differ from 1 by more than 1e-3")
    for name in per_feature:
        tlo, tmean, thi = _summary(m.get_tensor(name))
        print(f"{name:<14}min {tlo:.6g}, mean {tmean:.6g}, max {thi:.6g}")
    return 0


def _num(v) -> str:
    if isinstance(v, str):  # normalize's name
        return v
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


# ------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    m = Model.load(args.input)
    m.save(args.output)
    if not args.quiet:
        out = f", d_out {m.d_out}" if m.is_transcoder else ""
        print(f"wrote {args.output}: {_kind(m)}, {m.arch}, d_in {m.d_in}, d_sae {m.d_sae}{out} "
              f"(from {m.format}, {m.dtype})", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------
# top
# ------------------------------------------------------------------------------------------

def _open_acts(path: str, d_in: int, what: str = "d_in") -> NpyFile:
    f = NpyFile(path)
    if f.cols != d_in:
        f.close()
        raise CliError(f"{path}: rows of {f.cols} values, but the model's {what} is {d_in}")
    return f


def _read_target(path: str, m: Model, rows: int):
    """The --target file: [rows, d_out], paired row by row with the activations."""
    with _open_acts(path, m.d_out, "d_out") as f:
        if f.rows != rows:
            raise CliError(f"{path} has {f.rows} rows, but the activations have {rows}: "
                           "the target pairs each activation row with the row to predict")
        return f.read()


def _needs_target(m: Model, path: str, command: str, what: str) -> None:
    if m.is_transcoder and path is None:
        raise CliError(f"{command}: this model is a transcoder (d_in {m.d_in} -> d_out "
                       f"{m.d_out}): ACTS.npy is its input (an MLP's input); {what} give "
                       f"--target Y.npy, the matching outputs [tokens, {m.d_out}]")


# ------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------

def cmd_evaluate(args) -> int:
    m = Model.load(args.file)
    _needs_target(m, args.target, "evaluate", "it is scored against what it should predict:")
    with _open_acts(args.acts, m.d_in) as acts:
        if acts.rows == 0:
            raise CliError(f"{args.acts} has no rows")
        x = acts.read()
        rows = acts.rows
    y = None if args.target is None else _read_target(args.target, m, rows)
    values = m.evaluate(x, y)
    if args.json:
        import json
        print(json.dumps({"file": str(args.file), "tokens": rows,
                          "target": None if args.target is None else str(args.target),
                          "metrics": values}, indent=2))
        return 0
    for name, v in values.items():
        print(f"{name:<20}{v:.6g}")
    return 0


def cmd_top(args) -> int:
    m = Model.load(args.file)
    with _open_acts(args.acts, m.d_in) as acts:
        first = args.first
        if first > acts.rows:
            raise CliError(f"--first {first} is past the last row of {args.acts} "
                           f"({acts.rows} rows)")
        last = acts.rows if args.count is None else min(acts.rows, first + args.count)
        out = sys.stdout
        t = first
        while t < last:
            n = min(args.batch, last - t)
            idx, val, count = m.encode_sparse(acts.read(t, n), args.k)
            idx, val, count = _flat(idx), _flat(val), _flat(count)
            for r in range(n):
                c = int(count[r])
                base = r * args.k
                feats = " ".join(f"{idx[base + j]}:{val[base + j]:.4g}" for j in range(c))
                out.write(f"{t + r}\t{feats}\n")
            t += n
    return 0


def _flat(a):
    return a.reshape(-1).tolist() if HAVE_NUMPY else a


# ------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on a terminal; a line every tenth of the run otherwise."""

    def __init__(self, total: int, stream=sys.stderr, quiet: bool = False):
        self.total, self.stream, self.quiet = total, stream, quiet
        self.tty = stream.isatty()
        self.start = time.monotonic()
        self.last_print = -1

    def update(self, done: int, tokens: int, metrics: dict, passes: str = "") -> None:
        if self.quiet:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        width = 24
        filled = int(width * done / self.total)
        eta = elapsed / done * (self.total - done) if done else 0.0
        held = metrics.get("heldout_fvu", float("nan"))
        held = "" if held != held else f" (held-out {held:.4f})"
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} steps  "
                f"{passes}loss {metrics['loss']:.4g}  fvu {metrics['fvu']:.4f}{held}  "
                f"l0 {metrics['l0']:.1f}  "
                f"dead {100 * metrics['dead_fraction']:.1f}%  {tokens / elapsed:,.0f} tok/s  "
                f"eta {eta:.0f}s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
            self.stream.flush()
        else:
            tenth = done * 10 // self.total
            if tenth != self.last_print or done == self.total:
                self.last_print = tenth
                self.stream.write(line + "\n")
                self.stream.flush()


def _groups(text: Optional[str], d_sae: int) -> List[int]:
    """Matryoshka group sizes from "A,B,...", or by default groups doubling from d_sae/32:
    d_sae/32, /16, /8, /4 and the rest (the library checks that they sum to d_sae)."""
    if text is None:
        sizes = [d_sae // div for div in (32, 16, 8, 4) if d_sae // div > 0]
        return sizes + [d_sae - sum(sizes)]
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"--groups {text!r}: expected sizes like 16,48,192") from None


#: The default run (docs/training.md, "Defaults for the run"): passes over the data until
#: TOKENS_PER_LATENT * d_sae tokens, at most MAX_PASSES of them, never less than one; the last
#: tenth of the rows (at most HELDOUT_MAX) held out for the held-out metrics.
TOKENS_PER_LATENT, MAX_PASSES, HELDOUT_MAX = 2048, 20, 8192


def default_k(d_in: int) -> int:
    """OpenAI's k = 32 (GPT-2 small, d_in 768), at most d_in / 4: d_in random directions already
    span the input, so a code with that many active latents describes any vector without
    having learnt features (docs/training.md)."""
    return max(1, min(32, d_in // 4))


def plan_run(rows: int, batch: int, d_sae: int, heldout: Optional[int]) -> Tuple[int, int, float]:
    """(held-out rows, steps, passes) of the default run over `rows` rows."""
    if heldout is None:
        heldout = min(rows // 10, HELDOUT_MAX)
        if rows - heldout < batch:
            heldout = 0
    train = rows - heldout
    passes = min(float(MAX_PASSES), max(1.0, TOKENS_PER_LATENT * d_sae / train))
    steps = max(1, -(-int(passes * train) // batch))
    return heldout, steps, passes


def cmd_train(args) -> int:
    if not has("sae_trainer_new"):
        raise CliError("this libsae has no trainer (sae_trainer_new is missing from "
                       "the loaded library); build a newer libsae")
    if args.skip and args.target is None:
        raise CliError("--skip is for a transcoder: give its targets with --target Y.npy")
    with contextlib.ExitStack() as stack:
        acts = stack.enter_context(NpyFile(args.acts))
        d_in, rows = acts.cols, acts.rows
        target = stack.enter_context(NpyFile(args.target)) if args.target else None
        if target is not None and target.rows != rows:
            raise CliError(f"{args.target} has {target.rows} rows, {args.acts} has {rows}")
        d_sae = args.d_sae or d_in * args.expansion
        heldout, planned, passes = plan_run(rows, args.batch_size, d_sae, args.heldout)
        if rows - heldout < args.batch_size:
            raise CliError(f"{args.acts} has {rows} rows ({heldout} held out), fewer than one "
                           f"batch (--batch-size {args.batch_size})")
        kw = {}
        if args.arch in ("topk", "batchtopk", "matryoshka"):
            kw["k"] = args.k if args.k_given else default_k(d_in)
        elif args.k_given:
            raise CliError(f"-k applies to topk, batchtopk and matryoshka, not {args.arch}")
        groups = _groups(args.groups, d_sae) if args.arch == "matryoshka" else None
        if args.groups is not None and groups is None:
            raise CliError(f"--groups applies to matryoshka, not {args.arch}")
        arch = "batchtopk" if args.arch == "matryoshka" else args.arch
        if target is not None:
            m = Model.new_transcoder(arch, d_in, d_sae, target.cols, skip=args.skip, **kw)
        else:
            m = Model.new(arch, d_in, d_sae, **kw)
        train_rows = rows - heldout
        steps = args.steps if args.steps is not None else planned
        # A latent silent for a tenth of the run is dead (OpenAI's 10M tokens, for shorter runs).
        params = {"seed": args.seed, "total_steps": steps,
                  "dead_tokens": max(1, min(10_000_000, steps * args.batch_size // 10))}
        for name in ("lr", "l1_coeff", "auxk", "auxk_coeff", "dead_tokens", "warmup_steps",
                     "l0_coeff", "jumprelu_bandwidth"):
            v = getattr(args, name)
            if v is not None:
                params[name] = v
        t = Trainer(m, groups=groups, **params)
        n0 = min(train_rows, args.init_tokens)
        t.init(acts.read(0, n0), target.read(0, n0) if target is not None else None)
        if heldout:
            t.set_heldout(acts.read(train_rows, heldout),
                          target.read(train_rows, heldout) if target is not None else None)
        starts = list(range(0, train_rows - args.batch_size + 1, args.batch_size))
        total_passes = steps * args.batch_size / train_rows
        if not args.quiet:
            how = ("--steps" if args.steps is not None else
                   f"default: up to {TOKENS_PER_LATENT} tokens per latent, at most "
                   f"{MAX_PASSES} passes")
            print(f"{args.arch} {d_in} -> {d_sae}: {steps} steps of {args.batch_size} = "
                  f"{steps * args.batch_size:,} tokens, {total_passes:.3g} passes over "
                  f"{train_rows:,} rows ({how}); "
                  + (f"held out: the last {heldout:,} rows" if heldout else "nothing held out"),
                  file=sys.stderr)
        rng = random.Random(args.seed)
        progress = Progress(steps, quiet=args.quiet)
        order: List[int] = []
        tokens = 0
        metrics = {}
        warned = 0
        for step in range(1, steps + 1):
            if not order:  # a new epoch: batches in a new random order
                order = starts[:]
                rng.shuffle(order)
            at = order.pop()
            metrics = t.step(acts.read(at, args.batch_size),
                             target.read(at, args.batch_size) if target is not None else None)
            tokens += args.batch_size
            bits = metrics.get("warnings", 0)
            if bits & ~warned:  # each warning once, when it first holds
                warned |= bits
                print(f"\nwarning at step {step}: {t.warning()}", file=sys.stderr)
            done = int(10 * min(tokens / train_rows + 1e-9, total_passes)) / 10  # not rounded up
            progress.update(step, tokens, metrics, f"pass {done:.1f}/{total_passes:.3g}  ")
        warning = t.warning()
        t.close()
        m.save(args.output)
    if not args.quiet:
        held = metrics.get("heldout_fvu", float("nan"))
        held = ("" if held != held else
                f"; held-out fvu {held:.4f}, l0 {metrics.get('heldout_l0'):.1f}")
        print(f"wrote {args.output}: {args.arch}, d_in {d_in}, d_sae {d_sae}, {steps} steps of "
              f"{args.batch_size}; last batch fvu {metrics.get('fvu', float('nan')):.4f}, "
              f"l0 {metrics.get('l0', float('nan')):.1f}{held}", file=sys.stderr)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------
# steer
# ------------------------------------------------------------------------------------------

def _feature_op(text: str) -> Tuple[int, float]:
    feature, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        f = int(feature)
        if f < 0:
            raise ValueError
        return f, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FEATURE=VALUE with a feature index >= 0 and a number, got {text!r}") \
            from None


def cmd_steer(args) -> int:
    if not has("sae_steer_new"):
        raise CliError("this libsae has no steering (sae_steer_new is missing from the loaded "
                       "library); build a newer libsae")
    ops = [("clamp", o) for o in args.clamp] + [("scale", o) for o in args.scale] + \
          [("add", o) for o in args.add]
    m = Model.load(args.file)
    _needs_target(m, args.target, "steer", "steering changes the outputs it predicts:")
    with _open_acts(args.acts, m.d_in) as acts:
        x = acts.read()
        rows = acts.rows
    y = None if args.target is None else _read_target(args.target, m, rows)
    with Steering(m) as s:
        for op, (feature, value) in ops:
            getattr(s, op)(feature, value)
        if y is None:
            s.apply(x)
        else:
            s.apply_to(x, y)
    save_npy(args.output, x if y is None else y, m.d_in if y is None else m.d_out)
    if not args.quiet:
        print(f"wrote {args.output}: {rows} tokens steered by {len(ops)} op(s)"
              + (f" (features read from {args.acts})" if y is not None else ""),
              file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        v = int(text)
        if v < 1:
            raise ValueError
        return v
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None


def _nonneg(text: str) -> int:
    try:
        v = int(text)
        if v < 0:
            raise ValueError
        return v
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None


class _KGiven(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.k_given = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Sparse autoencoder files and activations from the command line "
        f"(libsae {version_string}).",
        epilog="Exit status: 0 success, 1 the library or a file refused (message on stderr), "
        "2 a wrong command line.")
    p.add_argument("--version", action="version", version=f"libsae {version_string}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("info", help="describe a model file or folder",
                       description="Describe a model: format, kind (SAE, or transcoder with "
                       "or without a skip connection), architecture, shapes (d_in, d_sae, "
                       "d_out), dtype, normalization, every parameter, and a summary of the "
                       "decoder rows' norms as the library keeps them.")
    s.add_argument("file", metavar="FILE", help="libsae file, SAELens/sparsify folder, "
                   "Gemma Scope params.npz")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(run=cmd_info)

    s = sub.add_parser("convert", help="convert any loadable model to libsae's file",
                       description="Load a model in any format libsae reads and save it as "
                       "libsae's safetensors file (F32, atomic).")
    s.add_argument("input", metavar="IN")
    s.add_argument("output", metavar="OUT")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(run=cmd_convert)

    s = sub.add_parser("top", help="each token's strongest features",
                       description="Encode activations and print, one line per token, the token "
                       "index and its strongest features as FEATURE:VALUE, largest first.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("acts", metavar="ACTS.npy", help="float activations [tokens, d_in]")
    s.add_argument("-k", type=_positive, default=8, help="features per token (default 8)")
    s.add_argument("--first", type=_nonneg, default=0, help="first token (default 0)")
    s.add_argument("--count", type=_nonneg, default=None, help="number of tokens (default all)")
    s.add_argument("--batch", type=_positive, default=1024, help=argparse.SUPPRESS)
    s.set_defaults(run=cmd_top)

    s = sub.add_parser("evaluate", help="how well a model reconstructs (or predicts) activations",
                       description="Score a model on activations, as SAELens' evals do: mse, "
                       "fvu, explained_variance, l0, l1, cosine, l2_ratio, dead_fraction. An "
                       "SAE is scored against ACTS.npy itself; a transcoder against --target.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("acts", metavar="ACTS.npy", help="float activations [tokens, d_in]")
    s.add_argument("--target", metavar="Y.npy", default=None,
                   help="what the model should predict from each row of ACTS.npy "
                   "[tokens, d_out] (required for a transcoder: the MLP's output)")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(run=cmd_evaluate)

    s = sub.add_parser("train", help="train an SAE on activations",
                       description="Train an SAE on activations read from a .npy file in "
                       "shuffled batches, with a progress bar on stderr, and save it.")
    s.add_argument("acts", metavar="ACTS.npy", help="float activations [tokens, d_in]")
    s.add_argument("output", metavar="OUT", help="where to save the trained model")
    s.add_argument("--arch", choices=["topk", "relu", "batchtopk", "jumprelu", "matryoshka"],
                   default="topk", help="architecture (default topk); matryoshka trains a "
                   "batchtopk model with nested group losses")
    s.add_argument("-k", "--k", type=_positive, default=None, action=_KGiven,
                   help="features per token for topk, batchtopk and matryoshka (default 32, at "
                   "most d_in / 4)")
    s.add_argument("--groups", default=None, metavar="A,B,...",
                   help="matryoshka group sizes, summing to d_sae (default d_sae/32, /16, /8, "
                   "/4 and the rest)")
    s.add_argument("--l0-coeff", type=float, default=None, help="JumpReLU's L0 coefficient")
    s.add_argument("--jumprelu-bandwidth", type=float, default=None,
                   help="JumpReLU's kernel width for the threshold's gradient")
    s.add_argument("--d-sae", type=_positive, default=None,
                   help="number of features (default d_in x --expansion)")
    s.add_argument("--expansion", type=_positive, default=8, help="default 8")
    s.add_argument("--steps", type=_positive, default=None,
                   help="Adam steps (default: passes over the data up to 2048 tokens per "
                   "latent, at most 20 passes; docs/training.md)")
    s.add_argument("--batch-size", type=_positive, default=1024, help="tokens per step "
                   "(default 1024)")
    s.add_argument("--init-tokens", type=_positive, default=16384,
                   help="tokens for the data-aware initialization (default 16384)")
    s.add_argument("--lr", type=float, default=None, help="learning rate (library default)")
    s.add_argument("--l1-coeff", type=float, default=None, help="ReLU's L1 coefficient")
    s.add_argument("--auxk", type=float, default=None, help="TopK's AuxK latents")
    s.add_argument("--auxk-coeff", type=float, default=None)
    s.add_argument("--dead-tokens", type=float, default=None)
    s.add_argument("--warmup-steps", type=float, default=None)
    s.add_argument("--seed", type=_nonneg, default=0, help="default 0")
    s.add_argument("--heldout", type=_nonneg, default=None, metavar="N",
                   help="rows at the end of ACTS.npy kept out of training for the held-out "
                   "metrics (default a tenth, at most 8192; 0: none)")
    s.add_argument("--target", metavar="Y.npy", default=None,
                   help="train a transcoder predicting these rows [tokens, d_out] from ACTS.npy "
                   "(e.g. an MLP's output for its input)")
    s.add_argument("--skip", action="store_true",
                   help="the transcoder has an affine skip connection W_skip")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=cmd_train, k_given=False)

    s = sub.add_parser("steer", help="steer activations by clamping, scaling or adding features",
                       description="Apply feature operations to activations and write the "
                       "steered activations. clamp and scale keep the SAE's error term; add adds "
                       "the feature's decoder direction. A later op on a feature replaces an "
                       "earlier one.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("acts", metavar="ACTS.npy", help="activations the features are read from "
                   "[tokens, d_in]; steered and written unless --target is given")
    s.add_argument("--target", metavar="Y.npy", default=None,
                   help="steer these activations [tokens, d_out] instead, row by row with "
                   "ACTS.npy, and write them (required for a transcoder: the MLP's output)")
    s.add_argument("--clamp", type=_feature_op, action="append", default=[], metavar="F=V",
                   help="set feature F to V (0 ablates it); repeatable")
    s.add_argument("--scale", type=_feature_op, action="append", default=[], metavar="F=X",
                   help="multiply feature F by X; repeatable")
    s.add_argument("--add", type=_feature_op, action="append", default=[], metavar="F=C",
                   help="add C times feature F's direction; repeatable")
    s.add_argument("-o", "--output", metavar="OUT.npy", required=True)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(run=cmd_steer)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "steer" and not (args.clamp or args.scale or args.add):
        parser.exit(2, f"{PROG} steer: error: give at least one --clamp, --scale or --add\n")
    try:
        return args.run(args)
    except (LibsaeError, CliError, ValueError) as e:  # ValueError: an argument refused
        print(f"libsae: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        print(f"libsae: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("libsae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
