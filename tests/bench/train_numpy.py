"""The TopK training recipe of bench_train, written in numpy the way a Python user would: dense
forward and backward passes with float32 arrays (OpenAI's train.py, without torch).

    python3 train_numpy.py DATA.npy INIT_DIR STEPS BATCH SCALE

INIT_DIR holds W_enc.npy, W_dec.npy, b_enc.npy, b_dec.npy as libsae's trainer initialized them;
SCALE is the input scale it chose. Prints "numpy fvu F l0 L tok/s T" (FVU and L0 over the whole
file after training, training tokens per second).
"""
import sys
import time

import numpy as np

D_SAE, K, STRIDE = 512, 16, 7919
LR, B1, B2, EPS = 2e-3, 0.9, 0.999, 6.25e-10
AUXK, AUXK_COEFF, DEAD_TOKENS = 256, 1.0 / 32, 100000


def main():
    data, init, steps, batch, scale = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    x_all = np.load(data).astype(np.float32)
    n, d = x_all.shape
    W_enc = np.load(f"{init}/W_enc.npy")
    W_dec = np.load(f"{init}/W_dec.npy")
    b_enc = np.load(f"{init}/b_enc.npy").reshape(-1)
    b_dec = np.load(f"{init}/b_dec.npy").reshape(-1)
    params = [W_enc, W_dec, b_enc, b_dec]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    scale = np.float32(scale)

    sample = x_all[(np.arange(8192) * STRIDE) % n] * scale
    mse_norm = float(((sample - sample.mean(0)) ** 2).sum(1).mean())
    aux_norm = mse_norm
    since_fired = np.zeros(D_SAE, dtype=np.int64)

    start = time.perf_counter()
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
    secs = time.perf_counter() - start

    xs = x_all * scale
    pre = (xs - b_dec) @ W_enc + b_enc
    idx = np.argpartition(-pre, K - 1, axis=1)[:, :K]
    vals = np.maximum(np.take_along_axis(pre, idx, 1), 0)
    f = np.zeros_like(pre)
    np.put_along_axis(f, idx, vals, 1)
    x_hat = (f @ W_dec + b_dec) / scale
    fvu = float(((x_all - x_hat) ** 2).sum() / ((x_all - x_all.mean(0)) ** 2).sum())
    l0 = float((f > 0).sum(1).mean())
    print(f"numpy fvu {fvu:.6f} l0 {l0:.4f} tok/s {steps * batch / secs:.1f}")


if __name__ == "__main__":
    main()
