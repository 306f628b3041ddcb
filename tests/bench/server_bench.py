#!/usr/bin/python3
"""sae-server throughput on stories260K: tokens/s with and without a steering plan, the plan's
cost per token, tokens/s of parallel clients, and /v1/features latency. Standard library only.

usage: server_bench.py SAE_SERVER MODEL.gguf SAE [--turns N] [--threads N]

Greedy completions of 100 tokens. Per-token time is read two ways: the client's wall time per
generated token, and the engine's own llama_decode time (GET /health: decode_seconds over
decode_steps, hooks and libsae included). Plan and no-plan requests alternate, each turn in a
fresh random order, and the medians are reported: the machine may be shared.
"""
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

HOOK = "blocks.2.hook_resid_pre"


def start(binary, model, sae, threads, parallel):
    args = [binary, "-m", model, "--port", "0", "--threads", str(threads), "--parallel",
            str(parallel), "--max-tokens", "120"]
    if sae:
        args += ["--sae", f"{HOOK}={sae}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return p, port


def call(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    o = json.loads(r.read())
    c.close()
    if r.status != 200:
        raise SystemExit(f"{path}: {r.status} {o}")
    return o


def health(port):
    h = call(port, "GET", "/health")
    return (h["decode_steps"], h["decode_seconds"], h.get("hook_seconds", 0),
            h.get("libsae_seconds", 0))


def generation(port, plan, n=100):
    """client seconds per token; per decode step: seconds in llama_decode, in the hooks'
    callback, in libsae (the plan)"""
    body = {"prompt": "Once upon a time", "max_tokens": n, "temperature": 0}
    if plan:
        body["steering"] = plan
    h0 = health(port)
    t0 = time.perf_counter()
    o = call(port, "POST", "/v1/completions", body)
    wall = time.perf_counter() - t0
    h1 = health(port)
    gen = o["usage"]["completion_tokens"]
    steps = max(1, h1[0] - h0[0])  # the prompt, then one step per token
    return wall / gen, (h1[1] - h0[1]) / steps, (h1[2] - h0[2]) / steps, (h1[3] - h0[3]) / steps


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main():
    a = sys.argv[1:]
    if len(a) < 3:
        raise SystemExit(__doc__)
    binary, model, sae = a[:3]
    turns = int(a[a.index("--turns") + 1]) if "--turns" in a else 30
    threads = int(a[a.index("--threads") + 1]) if "--threads" in a else 1
    plans = {
        "no dictionary (no hooks)": None,
        "dictionary, no plan": None,
        "clamp 1 feature": [{"hook": HOOK, "feature": 3, "op": "clamp", "value": 0.0}],
        "8 ops (clamp, scale, add)": [
            {"hook": HOOK, "feature": f, "op": op, "value": v}
            for f, op, v in [(3, "clamp", 0.0), (77, "clamp", 0.0), (508, "scale", 0.5),
                             (10, "add", 0.1), (11, "scale", 1.5), (12, "clamp", 0.0),
                             (13, "add", -0.1), (14, "scale", 0.9)]],
    }
    bare, bport = start(binary, model, None, threads, 4)
    srv, port = start(binary, model, sae, threads, 4)
    rng = random.Random(1)
    wall = {k: [] for k in plans}
    dec = {k: [] for k in plans}
    hook = {k: [] for k in plans}
    lib = {k: [] for k in plans}
    try:
        for k in plans:  # warm up
            generation(bport if k.startswith("no dict") else port, plans[k])
        for _ in range(turns):
            order = list(plans)
            rng.shuffle(order)
            for k in order:
                w, d, hk, lb = generation(bport if k.startswith("no dict") else port, plans[k])
                wall[k].append(w)
                dec[k].append(d)
                hook[k].append(hk)
                lib[k].append(lb)
        # parallel clients, no plan and each its own plan: rounds in a fresh random order,
        # the median of each configuration's tokens/s
        par = {(nc, st): [] for nc in (1, 4) for st in (False, True)}
        for _ in range(max(3, turns // 8)):
            order = list(par)
            rng.shuffle(order)
            for nc, steered in order:
                done = []

                def client(i, steered=steered):
                    plan = [{"hook": HOOK, "feature": 3 + i, "op": "clamp", "value": 0.0}] \
                        if steered else None
                    for _ in range(5):
                        done.append(generation_only(port, plan))

                t0 = time.perf_counter()
                th = [threading.Thread(target=client, args=(i,)) for i in range(nc)]
                for t in th:
                    t.start()
                for t in th:
                    t.join()
                par[(nc, steered)].append(sum(done) / (time.perf_counter() - t0))
        par = {k: statistics.median(v) for k, v in par.items()}
        # /v1/features latency
        short = "Lily was happy"
        long = ("Once upon a time, there was a little girl named Lily. She loved to play "
                "outside in the park. One day, she saw a big red ball") * 2
        lat = {}
        for name, text in (("short", short), ("long", long)):
            ts = []
            for _ in range(turns):
                t0 = time.perf_counter()
                o = call(port, "POST", "/v1/features", {"text": text, "top_k": 8})
                ts.append(time.perf_counter() - t0)
            lat[name] = (len(o["tokens"]), statistics.median(ts), sorted(ts)[int(0.9 * len(ts))])
    finally:
        for p in (bare, srv):
            p.terminate()
            p.wait(30)

    print(f"sae-server on stories260K, {cpu_name()}, {os.cpu_count()} cpus, llama.cpp threads "
          f"{threads}, load {os.getloadavg()[0]:.1f}; {turns} turns of 100 greedy tokens each")
    print(f"{'':28s} {'client ms/token':>16s} {'tokens/s':>9s} {'decode ms/step':>15s} "
          f"{'hook us/step':>13s} {'plan us/step':>13s} {'plan/step':>10s}")
    base = statistics.median(dec["dictionary, no plan"])
    for k in plans:
        w, d = statistics.median(wall[k]), statistics.median(dec[k])
        hk, lb = statistics.median(hook[k]), statistics.median(lib[k])
        share = f"{100 * lb / base:9.2f}%" if lb else f"{'-':>10s}"
        print(f"{k:28s} {1e3 * w:16.3f} {1 / w:9.0f} {1e3 * d:15.3f} {1e6 * hk:13.1f} "
              f"{1e6 * lb:13.1f} {share}")
    print("(plan us/step: libsae's sae_steer_apply inside the hook; plan/step: that over the "
          "median decode step of the same server without a plan)")
    for (nc, steered), tps in sorted(par.items()):
        print(f"{nc} client(s){', each steered' if steered else ''}: {tps:.0f} tokens/s in all "
              f"(median of rounds)")
    for name, (n, med, p90) in lat.items():
        print(f"/v1/features, {name} text ({n} tokens, top 8): median {1e3 * med:.2f} ms, "
              f"p90 {1e3 * p90:.2f} ms")


def generation_only(port, plan):
    body = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0}
    if plan:
        body["steering"] = plan
    return call(port, "POST", "/v1/completions", body)["usage"]["completion_tokens"]


if __name__ == "__main__":
    main()
