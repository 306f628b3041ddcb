"""The training recipes of bench_train, written in numpy the way a Python user would: dense
forward and backward passes with float32 arrays. topk: OpenAI's train.py, without torch;
jumprelu: Rajamanoharan et al. 2024 as SAELens's JumpReLUTrainingSAE (L0 penalty, rectangle-
kernel straight-through estimators, log-thresholds); matryoshka: dictionary_learning's
MatryoshkaBatchTopKTrainer (nested prefix losses over BatchTopK codes, mean over groups).

    python3 train_numpy.py DATA.npy INIT_DIR STEPS BATCH SCALE [topk|jumprelu|matryoshka]

INIT_DIR holds W_enc.npy, W_dec.npy, b_enc.npy, b_dec.npy as libsae's trainer initialized them;
SCALE is the input scale it chose. Prints "numpy fvu F l0 L tok/s T tok/cpu-s C" (FVU and L0
over the whole file after training, training tokens per second of wall time and per second of
the process's CPU time, BLAS threads included).
"""
import sys
import time

import numpy as np

D_SAE, K, STRIDE = 512, 16, 7919
LR, B1, B2, EPS = 2e-3, 0.9, 0.999, 6.25e-10
AUXK, AUXK_COEFF, DEAD_TOKENS = 256, 1.0 / 32, 100000
# JumpReLU (bench_train's settings; libsae's defaults for the rest: Adam beta1 0, eps 1e-8)
JR_LR, JR_B1, JR_EPS, JR_L0, JR_BANDWIDTH, JR_THRESHOLD = 4e-3, 0.0, 1e-8, 0.2, 0.1, 0.5
# Matryoshka: BatchTopK with groups doubling from D_SAE / 32, its threshold's EMA rate
GROUPS, THRESHOLD_LR = [16, 32, 64, 128, 272], 0.01


def adam(params, grads, m, v, t, lr, b1, eps):
    bc1, bc2 = 1 - b1 ** t, 1 - B2 ** t
    for p, g, mm, vv in zip(params, grads, m, v):
        mm *= b1
        mm += (1 - b1) * g
        vv *= B2
        vv += (1 - B2) * g * g
        p -= (lr / bc1) * mm / (np.sqrt(vv) / np.sqrt(bc2) + eps)


def unit_rows_grad(g_Wdec, W_dec):
    """Removes each decoder row's gradient component along the row."""
    return g_Wdec - (g_Wdec * W_dec).sum(1, keepdims=True) / (W_dec * W_dec).sum(1, keepdims=True) * W_dec


def report(x_all, scale, encode, W_dec, b_dec, steps, batch, secs, cpu):
    xs = x_all * scale
    f = encode(xs)
    x_hat = (f @ W_dec + b_dec) / scale
    fvu = float(((x_all - x_hat) ** 2).sum() / ((x_all - x_all.mean(0)) ** 2).sum())
    l0 = float((f > 0).sum(1).mean())
    print(f"numpy fvu {fvu:.6f} l0 {l0:.4f} tok/s {steps * batch / secs:.1f} "
          f"tok/cpu-s {steps * batch / cpu:.1f}")


def jumprelu(x_all, params, steps, batch, scale):
    """Per token ||x_hat - x||^2 + L0 * sum_i H(pre_i - theta_i), theta = exp(log_th)."""
    n = len(x_all)
    W_enc, W_dec, b_enc, b_dec = params
    log_th = np.full(D_SAE, np.log(np.float32(JR_THRESHOLD)), dtype=np.float32)
    params = [W_enc, W_dec, b_enc, b_dec, log_th]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    inv_eps = np.float32(1.0 / JR_BANDWIDTH)
    start, cpu0 = time.perf_counter(), time.process_time()
    for s in range(steps):
        rows = ((s * batch + np.arange(batch)) * STRIDE) % n
        xs = x_all[rows] * scale
        xin = xs - b_dec
        pre = xin @ W_enc + b_enc
        th = np.exp(log_th)
        on = pre > th
        f = pre * on
        e = f @ W_dec + b_dec - xs
        g_e = (2.0 / batch) * e
        g_Wdec = f.T @ g_e
        g_f = g_e @ W_dec.T
        window = np.abs((pre - th) * inv_eps) < 0.5
        # d/dtheta: -(theta/eps) rect * dL/df - L0 (1/eps) rect / batch; then times theta
        g_th = -(window * (th * inv_eps * g_f + JR_L0 * inv_eps / batch)).sum(0)
        g_pre = g_f * on
        g_Wenc = xin.T @ g_pre
        g_benc = g_pre.sum(0)
        g_bdec = g_e.sum(0) - W_enc @ g_benc
        g_Wdec = unit_rows_grad(g_Wdec, W_dec)
        adam(params, [g_Wenc, g_Wdec, g_benc, g_bdec, g_th * th], m, v, s + 1, JR_LR, JR_B1,
             JR_EPS)
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu0
    th = np.exp(log_th)

    def encode(xs):
        pre = (xs - b_dec) @ W_enc + b_enc
        return pre * (pre > th)
    report(x_all, scale, encode, W_dec, b_dec, steps, batch, secs, cpu)


def batchtopk(pre, k):
    """The k * n largest positive values of pre, the rest 0; and the smallest kept."""
    flat = pre.reshape(-1)
    want = min(k * pre.shape[0], int((flat > 0).sum()))
    f = np.zeros_like(flat)
    if want == 0:
        return f.reshape(pre.shape), None
    idx = np.argpartition(-flat, want - 1)[:want]
    f[idx] = flat[idx]
    return f.reshape(pre.shape), float(flat[idx].min())


def matryoshka(x_all, params, steps, batch, scale):
    """Per token (1/G) sum_g ||x_hat_g - x||^2 / v over the prefixes of groups, plus AuxK."""
    n = len(x_all)
    W_enc, W_dec, b_enc, b_dec = params
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    ends = np.cumsum(GROUPS)
    starts = ends - GROUPS
    G = len(GROUPS)
    sample = x_all[(np.arange(8192) * STRIDE) % n] * scale
    mse_norm = float(((sample - sample.mean(0)) ** 2).sum(1).mean())
    aux_norm = mse_norm
    since_fired = np.zeros(D_SAE, dtype=np.int64)
    theta = 0.0
    start, cpu0 = time.perf_counter(), time.process_time()
    for s in range(steps):
        rows = ((s * batch + np.arange(batch)) * STRIDE) % n
        xs = x_all[rows] * scale
        xin = xs - b_dec
        pre = xin @ W_enc + b_enc
        f, kept_min = batchtopk(pre, K)
        # prefix errors, then the suffix sums S_g = (2 / (G v batch)) sum_{h >= g} e_h
        e = np.broadcast_to(b_dec - xs, xs.shape).copy()
        errs = []
        for a, b in zip(starts, ends):
            e = e + f[:, a:b] @ W_dec[a:b]
            errs.append(e)
        S = np.zeros_like(e)
        g_Wdec = np.empty_like(W_dec)
        g_f = np.empty_like(f)
        for g in range(G - 1, -1, -1):
            S = S + (2.0 / (G * mse_norm * batch)) * errs[g]
            a, b = starts[g], ends[g]
            g_Wdec[a:b] = f[:, a:b].T @ S
            g_f[:, a:b] = S @ W_dec[a:b].T
        g_bdec = S.sum(0)
        g_pre = g_f * (f > 0)
        e = errs[-1]
        dead = since_fired >= DEAD_TOKENS
        if dead.any():
            ka = min(AUXK, int(dead.sum()))
            masked = np.where(dead, pre, -np.inf)
            aidx = np.argpartition(-masked, ka - 1, axis=1)[:, :ka]
            avals = np.maximum(np.take_along_axis(pre, aidx, 1), 0)
            fa = np.zeros_like(pre)
            np.put_along_axis(fa, aidx, avals, 1)
            g_a = (2.0 * AUXK_COEFF / aux_norm / batch) * (fa @ W_dec + e)
            g_bdec += g_a.sum(0)
            g_Wdec += fa.T @ g_a
            g_pre += (g_a @ W_dec.T) * (fa > 0)
        g_Wenc = xin.T @ g_pre
        g_benc = g_pre.sum(0)
        g_bdec -= W_enc @ g_benc
        g_Wdec = unit_rows_grad(g_Wdec, W_dec)
        adam(params, [g_Wenc, g_Wdec, g_benc, g_bdec], m, v, s + 1, LR, B1, EPS)
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
        if kept_min is not None:
            theta = (1 - THRESHOLD_LR) * theta + THRESHOLD_LR * kept_min
        since_fired = np.where((f > 0).any(0), 0, since_fired + batch)
        r = -e
        var = float(((r - r.mean(0)) ** 2).sum(1).mean())
        if var > 0:
            aux_norm = var
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu0
    th = np.float32(theta)

    def encode(xs):
        pre = (xs - b_dec) @ W_enc + b_enc
        return pre * ((pre > th) & (pre > 0))
    report(x_all, scale, encode, W_dec, b_dec, steps, batch, secs, cpu)


def main():
    data, init, steps, batch, scale = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    recipe = sys.argv[6] if len(sys.argv) > 6 else "topk"
    x_all = np.load(data).astype(np.float32)
    n, d = x_all.shape
    W_enc = np.load(f"{init}/W_enc.npy")
    W_dec = np.load(f"{init}/W_dec.npy")
    b_enc = np.load(f"{init}/b_enc.npy").reshape(-1)
    b_dec = np.load(f"{init}/b_dec.npy").reshape(-1)
    params = [W_enc, W_dec, b_enc, b_dec]
    if recipe != "topk":
        {"jumprelu": jumprelu, "matryoshka": matryoshka}[recipe](x_all, params, steps, batch,
                                                                np.float32(scale))
        return
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    scale = np.float32(scale)

    sample = x_all[(np.arange(8192) * STRIDE) % n] * scale
    mse_norm = float(((sample - sample.mean(0)) ** 2).sum(1).mean())
    aux_norm = mse_norm
    since_fired = np.zeros(D_SAE, dtype=np.int64)

    start, cpu0 = time.perf_counter(), time.process_time()
    for s in range(steps):
        rows = ((s * batch + np.arange(batch)) * STRIDE) % n
        xs = x_all[rows] * scale
        xin = xs - b_dec
        pre = xin @ W_enc + b_enc
        idx = np.argpartition(-pre, K - 1, axis=1)[:, :K]
        vals = np.maximum(np.take_along_axis(pre, idx, 1), 0)
        f = np.zeros_like(pre)
        np.put_along_axis(f, idx, vals, 1)
        e = f @ W_dec + b_dec - xs
        g_e = (2.0 / mse_norm / batch) * e
        g_bdec = g_e.sum(0)
        dead = since_fired >= DEAD_TOKENS
        g_aux_f = None
        if dead.any():
            ka = min(AUXK, int(dead.sum()))
            masked = np.where(dead, pre, -np.inf)
            aidx = np.argpartition(-masked, ka - 1, axis=1)[:, :ka]
            avals = np.maximum(np.take_along_axis(pre, aidx, 1), 0)
            fa = np.zeros_like(pre)
            np.put_along_axis(fa, aidx, avals, 1)
            diff = fa @ W_dec + e
            g_a = (2.0 * AUXK_COEFF / aux_norm / batch) * diff
            g_bdec += g_a.sum(0)
            g_aux_f = (fa, g_a)
        g_Wdec = f.T @ g_e
        g_pre = (g_e @ W_dec.T) * (f > 0)
        if g_aux_f is not None:
            fa, g_a = g_aux_f
            g_Wdec += fa.T @ g_a
            g_pre += (g_a @ W_dec.T) * (fa > 0)
        g_Wenc = xin.T @ g_pre
        g_benc = g_pre.sum(0)
        g_bdec -= W_enc @ g_benc
        # unit-norm decoder rows: remove the parallel component, step, renormalize
        g_Wdec -= (g_Wdec * W_dec).sum(1, keepdims=True) / (W_dec * W_dec).sum(1, keepdims=True) * W_dec
        grads = [g_Wenc, g_Wdec, g_benc, g_bdec]
        t = s + 1
        bc1, bc2 = 1 - B1 ** t, 1 - B2 ** t
        for p, g, mm, vv in zip(params, grads, m, v):
            mm *= B1
            mm += (1 - B1) * g
            vv *= B2
            vv += (1 - B2) * g * g
            p -= (LR / bc1) * mm / (np.sqrt(vv) / np.sqrt(bc2) + EPS)
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
        fired = (f > 0).any(0)
        since_fired = np.where(fired, 0, since_fired + batch)
        r = -e
        var = float(((r - r.mean(0)) ** 2).sum(1).mean())
        if var > 0:
            aux_norm = var
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu0

    xs = x_all * scale
    pre = (xs - b_dec) @ W_enc + b_enc
    idx = np.argpartition(-pre, K - 1, axis=1)[:, :K]
    vals = np.maximum(np.take_along_axis(pre, idx, 1), 0)
    f = np.zeros_like(pre)
    np.put_along_axis(f, idx, vals, 1)
    x_hat = (f @ W_dec + b_dec) / scale
    fvu = float(((x_all - x_hat) ** 2).sum() / ((x_all - x_all.mean(0)) ** 2).sum())
    l0 = float((f > 0).sum(1).mean())
    print(f"numpy fvu {fvu:.6f} l0 {l0:.4f} tok/s {steps * batch / secs:.1f} "
          f"tok/cpu-s {steps * batch / cpu:.1f}")


if __name__ == "__main__":
    main()
