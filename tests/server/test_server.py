#!/usr/bin/python3
"""sae-server end to end, on localhost only, bounded in time: every endpoint; greedy generation
against llama2.c's reference.json (alone and batched) and against itself (streamed = not
streamed, stop strings, seeds); steered text against examples/llama.cpp's sae-llama-cpp;
steering (a no-op plan changes
nothing, a clamp changes the text, the plan is per request); every bad input gets its 4xx and the
next request still succeeds; 8 concurrent clients x 25 mixed requests, each response equal to
the same request sent alone; a per-request timeout; a full queue (429); a chat template;
SIGTERM mid-stream loses no started response. Standard library only.

usage: test_server.py SAE_SERVER MODEL.gguf SAE [--reference reference.json]
                      [--sae-llama-cpp PATH] [--openai-node SCRIPT NODE_PATH]
Every server runs llama.cpp on one thread: the machine may be shared, and ggml's OpenMP
barriers spin (a descheduled sibling thread stalls a step by a scheduler slice); one thread also
keeps ThreadSanitizer off ggml's uninstrumented OpenMP pool. SAE_SERVER_ARGS (environment):
more options for every server started.
"""
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

HOOK = "blocks.2.hook_resid_pre"
FAILS = []


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL:", what, flush=True)
    return cond


class Server:
    def __init__(self, binary, model, sae, *extra):
        self.proc = subprocess.Popen(
            [binary, "-m", model, "--sae", f"{HOOK}={sae}", "--port", "0", "--threads", "1",
             *extra,
             *os.environ.get("SAE_SERVER_ARGS", "").split()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise SystemExit("sae-server did not start: " + line + self.proc.stderr.read())
        self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        self.log = []
        self.t = threading.Thread(target=self._drain, daemon=True)
        self.t.start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.t.join(5)
        if rc != 0:
            print("".join(l for l in self.log if "Z 127.0.0.1 " not in l)[-6000:])
        return rc

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(self, method, path, body=None, raw=None):
        c = self.conn()
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        payload = r.read()
        c.close()
        ctype = r.getheader("Content-Type", "")
        return r.status, ctype, payload

    def post(self, path, body=None, raw=None):
        status, ctype, payload = self.request("POST", path, body, raw)
        return status, json.loads(payload) if "json" in ctype else payload

    def get(self, path):
        status, ctype, payload = self.request("GET", path)
        return status, ctype, payload

    def stream(self, path, body):
        """(status, text, finish_reason, events, saw_done)"""
        c = self.conn()
        c.request("POST", path, body=json.dumps(dict(body, stream=True)),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return read_stream(r, c, path.endswith("chat/completions"))


def read_stream(r, c, chat, first_only=False):
    text, finish, events, done, err = "", None, 0, False, None
    buf = b""
    while True:
        chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            ev = ev.decode()
            if not ev.startswith("data: "):
                continue
            data = ev[6:]
            if data == "[DONE]":
                done = True
                continue
            o = json.loads(data)
            if "error" in o:
                err = o["error"]
                continue
            events += 1
            ch = o["choices"][0]
            text += (ch["delta"].get("content") or "") if chat else ch["text"]
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
        if first_only and events:
            return r, c, text, events
    c.close()
    return r.status, text, finish, events, done, err


def gen_text(o, chat):
    ch = o["choices"][0]
    return ch["message"]["content"] if chat else ch["text"]


def completion(prompt, ntok=24, steering=None, **kw):
    b = {"model": "stories260K", "prompt": prompt, "max_tokens": ntok, "temperature": 0}
    if steering is not None:
        b["steering"] = steering
    b.update(kw)
    return b


def chat(prompt, ntok=24, steering=None, **kw):
    b = {"model": "stories260K", "messages": [{"role": "user", "content": prompt}],
         "max_tokens": ntok, "temperature": 0}
    if steering is not None:
        b["steering"] = steering
    b.update(kw)
    return b


def clamp(f, v, op="clamp"):
    return [{"hook": HOOK, "feature": f, "op": op, "value": v}]


def test_endpoints(s):
    st, ctype, body = s.get("/health")
    check(st == 200 and json.loads(body)["status"] == "ok", "GET /health")
    st, ctype, body = s.get("/v1/models")
    check(st == 200 and json.loads(body)["data"][0]["id"] == "stories260K", "GET /v1/models")
    st, ctype, body = s.get("/v1/features")
    d = json.loads(body)["data"]
    check(st == 200 and d[0]["hook"] == HOOK and d[0]["d_sae"] == 512 and d[0]["d_in"] == 64,
          "GET /v1/features lists the dictionary")
    st, ctype, body = s.get("/")
    check(st == 200 and ctype.startswith("text/html") and b"<html" in body.lower(),
          "GET / serves the page")
    # no --stats: the card is a 404 JSON error naming the reason
    st, ctype, body = s.get(f"/v1/features/{HOOK}/3")
    check(st == 404 and "statistics" in json.loads(body)["error"]["message"],
          "a card without statistics: 404")


def test_generation(s):
    st, a = s.post("/v1/completions", completion("Once upon a time", 30))
    check(st == 200, f"completion: {st} {a}")
    text = gen_text(a, False)
    check(a["object"] == "text_completion" and a["usage"]["completion_tokens"] == 30
          and a["usage"]["prompt_tokens"] == 5 and a["choices"][0]["finish_reason"] == "length",
          f"completion fields: {a}")
    check(text.startswith(", there was"), f"greedy text of stories260K: {text!r}")
    st, b = s.post("/v1/completions", completion("Once upon a time", 30))
    check(gen_text(b, False) == text, "greedy is deterministic")
    st2, t2, fin, ev, done, err = s.stream("/v1/completions", completion("Once upon a time", 30))
    check(st2 == 200 and t2 == text and fin == "length" and done and ev >= 2 and err is None,
          f"streamed completion = non-streamed ({t2!r} vs {text!r}, {fin}, {done})")
    # stop: the text up to the stop string's first occurrence
    word = " named"
    cut = text.index(word)
    st, c = s.post("/v1/completions", completion("Once upon a time", 30, stop=[word, "zzz"]))
    check(gen_text(c, False) == text[:cut] and c["choices"][0]["finish_reason"] == "stop",
          f"stop string: {gen_text(c, False)!r} vs {text[:cut]!r}")
    st, t3, fin, ev, done, err = s.stream("/v1/completions",
                                          completion("Once upon a time", 30, stop=word))
    check(t3 == text[:cut] and fin == "stop", f"streamed stop string: {t3!r}")
    # chat: the model has no template, so the user message is the prompt
    st, ch = s.post("/v1/chat/completions", chat("Once upon a time", 30))
    check(st == 200 and ch["object"] == "chat.completion"
          and ch["choices"][0]["message"]["role"] == "assistant"
          and gen_text(ch, True) == text, f"chat completion: {ch}")
    st, t4, fin, ev, done, err = s.stream("/v1/chat/completions", chat("Once upon a time", 30))
    check(t4 == text and fin == "length" and done, f"streamed chat: {t4!r}")
    # token-id prompt
    st, tk = s.post("/v1/completions", completion([1, 403, 407, 261, 378], 30))
    check(st == 200, f"token-id prompt {tk}")
    # sampling: the same seed gives the same text, temperature changes it
    r = [gen_text(s.post("/v1/completions", completion("Lily", 40, temperature=1.0, seed=k))[1],
                  False) for k in (7, 7, 8)]
    check(r[0] == r[1], "the same seed samples the same text")
    check(r[0] != r[2] or r[0] != text, "a different seed samples another text")
    return text


def test_reference(s, path):
    """Greedy text equals llama2.c's (reference.json: the model's own run, no early stop), for
    each case sent alone, then all cases at once (one batch), with token-id prompts."""
    cases = json.load(open(path))["cases"]

    def run(c):
        n_new = len(c["greedy_tokens"]) - len(c["prompt_tokens"])
        st, o = s.post("/v1/completions", completion(c["prompt_tokens"], n_new))
        return st, (c["prompt"] + gen_text(o, False)).lstrip() if st == 200 else o

    for c in cases:
        st, text = run(c)
        check(st == 200 and text == c["greedy_text"],
              f"reference {c['prompt']!r}: {text!r} vs {c['greedy_text']!r}")
    out = [None] * len(cases)
    ths = [threading.Thread(target=lambda i=i: out.__setitem__(i, run(cases[i])))
           for i in range(len(cases))]
    for t in ths:
        t.start()
    for t in ths:
        t.join(120)
    ok = check(all(o and o[0] == 200 and o[1] == c["greedy_text"] for o, c in zip(out, cases)),
               "reference cases decoded together in one batch")
    print(f"reference.json: {len(cases)} greedy cases, alone and batched: "
          f"{'equal' if ok else 'DIFFERENT'}")


def test_against_sae_llama_cpp(binary, model, sae, tool):
    """Steered greedy text equals examples/llama.cpp's sae-llama-cpp (one sequence, one plan on
    the adapter's entry) for several plans, each request alone and all at once in one batch. The
    server runs with --steer-bos: sae-llama-cpp steers every row, BOS included."""
    cases = [("Once upon a time", [("clamp", 365, 3.0)]),
             ("Lily wanted to fly", [("scale", 508, 0.0), ("clamp", 3, 2.0)]),
             ("Tom and his dog", [("add", 10, 2.0)]),
             ("The little cat", [("clamp", 77, 6.0), ("add", 11, -1.5)]),
             ("Once upon a time", [("scale", 418, 3.0)])]
    flag = {"clamp": "--clamp", "scale": "--scale", "add": "--add"}
    want = []
    for prompt, plan in cases:
        args = [tool, "-m", model, "--sae", sae, "-p", prompt, "-n", "30", "--json"]
        for op, f, v in plan:
            args += [flag[op], f"{f}:{v}"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        if not check(r.returncode == 0, f"sae-llama-cpp {args[5:]}: {r.stderr[-300:]}"):
            return
        want.append(json.loads(r.stdout)["text"])
    s = Server(binary, model, sae, "--steer-bos")
    try:
        def run(i):
            prompt, plan = cases[i]
            st, o = s.post("/v1/completions", completion(prompt, 30, [
                {"hook": HOOK, "feature": f, "op": op, "value": v} for op, f, v in plan]))
            return prompt + gen_text(o, False) if st == 200 else o

        alone = [run(i) for i in range(len(cases))]
        together = [None] * len(cases)
        ths = [threading.Thread(target=lambda i=i: together.__setitem__(i, run(i)))
               for i in range(len(cases))]
        for t in ths:
            t.start()
        for t in ths:
            t.join(120)
        for i, (prompt, plan) in enumerate(cases):
            check(alone[i] == want[i], f"steered {plan} alone = sae-llama-cpp: {alone[i]!r} vs "
                                       f"{want[i]!r}")
            check(together[i] == want[i], f"steered {plan} in a batch = sae-llama-cpp: "
                                          f"{together[i]!r}")
        print(f"sae-llama-cpp: {len(cases)} steered generations, alone and batched: "
              f"{'equal' if alone == want == together else 'DIFFERENT'}; e.g. {want[0][:60]!r}")
    finally:
        check(s.stop() == 0, "exit status after SIGTERM")


def test_steering(s, unsteered):
    # scale by 1 writes back exactly what was read: the text must not move
    st, a = s.post("/v1/completions", completion("Once upon a time", 30, clamp(3, 1.0, "scale")))
    check(st == 200 and gen_text(a, False) == unsteered, "a no-op plan leaves the text unchanged")
    st, b = s.post("/v1/completions", completion("Once upon a time", 30, clamp(3, 20.0)))
    check(st == 200 and gen_text(b, False) != unsteered,
          f"clamping a feature changes the text: {gen_text(b, False)!r}")
    st, c = s.post("/v1/completions", completion("Once upon a time", 30, clamp(3, 20.0)))
    check(gen_text(c, False) == gen_text(b, False), "steered greedy is deterministic")
    st, d = s.post("/v1/completions", completion("Once upon a time", 30))
    check(gen_text(d, False) == unsteered, "a plan lasts one request only")
    st, e = s.post("/v1/completions", completion("Once upon a time", 30, [
        {"hook": HOOK, "feature": 10, "op": "add", "value": 4.0},
        {"hook": HOOK, "feature": 11, "op": "scale", "value": 0.0}]))
    check(st == 200, f"add and scale ops: {st}")


def test_features(s):
    st, o = s.post("/v1/features", {"text": "Lily was happy", "top_k": 4,
                                    "features": [{"hook": HOOK, "feature": 508},
                                                 {"hook": HOOK, "feature": 0}]})
    check(st == 200, f"/v1/features: {st} {o}")
    toks = o["tokens"]
    check([t["text"] for t in toks] == ["<s>", " Lily", " was", " happy"],
          f"/v1/features tokens: {[t['text'] for t in toks]}")
    for t in toks:
        top = t["features"][HOOK]
        check(len(top) <= 4 and all(top[i]["value"] >= top[i + 1]["value"]
                                    for i in range(len(top) - 1)), "top features sorted")
        for f in top:
            for sel, v in zip((508, 0), t["values"]):
                if f["id"] == sel:
                    check(abs(f["value"] - v) <= 1e-5 * max(1.0, abs(v)),
                          "a selected feature's value equals its top-k value")
    check(any(f["id"] == 508 for f in toks[3]["features"][HOOK]) and toks[3]["values"][0] > 0,
          "feature 508 fires on ' happy'")
    # the same text again: the same numbers (the job's slot or neighbours do not matter)
    st, o2 = s.post("/v1/features", {"text": "Lily was happy", "top_k": 4,
                                     "features": [{"hook": HOOK, "feature": 508},
                                                  {"hook": HOOK, "feature": 0}]})
    check(o2["tokens"] == toks, "/v1/features is deterministic")


def test_bad_inputs(s):
    long_prompt = "Once upon a time " * 200
    cases = [
        ("malformed JSON", "/v1/completions", None, '{"prompt": "x", ', 400),
        ("not an object", "/v1/completions", None, '[1, 2]', 400),
        ("no prompt", "/v1/completions", {"max_tokens": 3}, None, 400),
        ("unknown hook", "/v1/completions",
         completion("Hi", 4, [{"hook": "blocks.9.hook_resid_pre", "feature": 1, "op": "clamp",
                               "value": 1}]), None, 400),
        ("feature out of range", "/v1/completions", completion("Hi", 4, clamp(512, 1.0)), None,
         400),
        ("negative feature", "/v1/chat/completions", chat("Hi", 4, clamp(-1, 1.0)), None, 400),
        ("bad op", "/v1/completions", completion("Hi", 4, clamp(3, 1.0, "multiply")), None, 400),
        ("value not a number", "/v1/completions",
         completion("Hi", 4, [{"hook": HOOK, "feature": 3, "op": "clamp", "value": "big"}]),
         None, 400),
        ("oversized prompt", "/v1/completions", completion(long_prompt, 4), None, 400),
        ("oversized prompt (chat)", "/v1/chat/completions", chat(long_prompt, 4), None, 400),
        ("oversized body", "/v1/completions", None,
         json.dumps(completion("x" * (2 << 20), 4)), 413),
        ("max_tokens above the limit", "/v1/completions", completion("Hi", 100000), None, 400),
        ("max_tokens zero", "/v1/completions", completion("Hi", 0), None, 400),
        ("temperature out of range", "/v1/completions", completion("Hi", 4, temperature=5),
         None, 400),
        ("n > 1", "/v1/completions", completion("Hi", 4, n=2), None, 400),
        ("stop not strings", "/v1/completions", completion("Hi", 4, stop=[1]), None, 400),
        ("token id out of vocabulary", "/v1/completions", completion([1, 99999], 4), None, 400),
        ("messages missing", "/v1/chat/completions", {"max_tokens": 3}, None, 400),
        ("features: no text", "/v1/features", {"top_k": 3}, None, 400),
        ("features: top_k 0", "/v1/features", {"text": "a", "top_k": 0}, None, 400),
        ("features: unknown hook", "/v1/features",
         {"text": "a", "features": [{"hook": "x", "feature": 1}]}, None, 400),
        ("features: feature out of range", "/v1/features",
         {"text": "a", "features": [{"hook": HOOK, "feature": 512}]}, None, 400),
    ]
    good = completion("Once upon a time", 8)
    for name, path, body, raw, want in cases:
        st, o = s.post(path, body, raw)
        check(st == want and isinstance(o, dict) and isinstance(o.get("error"), dict)
              and o["error"].get("message") and o["error"].get("type"),
              f"bad input '{name}': want {want} with a JSON error, got {st} {o}")
        st2, o2 = s.post("/v1/completions", good)
        check(st2 == 200 and o2["usage"]["completion_tokens"] == 8,
              f"the request after '{name}' succeeds")
    for name, path, want in [("unknown route", "/v1/nothing", 404),
                             ("card of an unknown hook", "/v1/features/blocks.7.hook_x/1", 404),
                             ("card id not a number", f"/v1/features/{HOOK}/abc", 400),
                             ("card id out of range", f"/v1/features/{HOOK}/512", 404),
                             ("GET on a POST route", "/v1/completions", 405)]:
        st, ctype, body = s.get(path)
        check(st == want and "error" in json.loads(body), f"'{name}': want {want}, got {st}")
    st, o2 = s.post("/v1/completions", good)
    check(st == 200, "the server keeps serving after every bad input")


def load_requests():
    """25 mixed requests per client: completions and chats, streamed and not, steered by one of
    several plans or not, and /v1/features."""
    prompts = ["Once upon a time", "Lily and Ben", "The cat sat", "One day, a little",
               "Tom had a big red"]
    plans = [None, clamp(3, 20.0), clamp(77, 8.0), clamp(508, 0.0, "scale"),
             [{"hook": HOOK, "feature": 10, "op": "add", "value": 3.0}]]
    rng = random.Random(1234)
    reqs = []
    for _ in range(8 * 25):
        kind = rng.choice(["completion", "completion", "chat", "features"])
        p = rng.choice(prompts)
        if kind == "features":
            reqs.append(("/v1/features", {"text": p, "top_k": 3}, False))
            continue
        plan = rng.choice(plans)
        n = rng.choice([8, 16, 24])
        body = completion(p, n, plan) if kind == "completion" else chat(p, n, plan)
        reqs.append(("/v1/completions" if kind == "completion" else "/v1/chat/completions", body,
                     rng.random() < 0.5))
    return reqs


def features_close(a, b):
    """Feature reports of one text: the same tokens and top features, the values equal to float
    rounding. A prompt batched with other sequences goes through llama.cpp's attention over a
    KV cache shared with them, which rounds its rows differently from the prompt alone (~1e-7
    relative; docs/server.md); generated text is compared exactly."""
    a, b = json.loads(a), json.loads(b)
    if [t["id"] for t in a] != [t["id"] for t in b]:
        return False
    for ta, tb in zip(a, b):
        fa, fb = ta["features"][HOOK], tb["features"][HOOK]
        if len(fa) != len(fb):
            return False
        for x, y in zip(fa, fb):
            if x["id"] != y["id"] or abs(x["value"] - y["value"]) > 1e-5 * max(1, abs(y["value"])):
                return False
    return True


def run_one(s, path, body, stream):
    if path == "/v1/features":
        st, o = s.post(path, body)
        return st, json.dumps(o["tokens"]) if st == 200 else o
    if stream:
        st, text, fin, ev, done, err = s.stream(path, body)
        return (st if done and err is None else -1), (text, fin)
    st, o = s.post(path, body)
    if st != 200:
        return st, o
    return st, (gen_text(o, path.endswith("chat/completions")), o["choices"][0]["finish_reason"])


def test_load(s):
    reqs = load_requests()
    expected = {}
    for path, body, _ in reqs:   # each distinct request alone (streaming or not: the same text)
        key = (path, json.dumps(body, sort_keys=True))
        if key not in expected:
            st, out = run_one(s, path, body, False)
            check(st == 200, f"alone: {path} {st}")
            expected[key] = out
    results = [None] * len(reqs)

    def client(c):
        for i in range(c * 25, c * 25 + 25):
            path, body, stream = reqs[i]
            try:
                results[i] = run_one(s, path, body, stream)
            except Exception as ex:  # noqa: BLE001 - a failed request is a test failure
                results[i] = (-2, repr(ex))

    t0 = time.time()
    ths = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(300)
    dt = time.time() - t0
    errors = sum(1 for r in results if r is None or r[0] != 200)
    mismatch = 0
    for (path, body, stream), r in zip(reqs, results):
        want = expected[(path, json.dumps(body, sort_keys=True))]
        if not r or r[0] != 200:
            continue
        same = features_close(r[1], want) if path == "/v1/features" else r[1] == want
        if not same:
            mismatch += 1
            if mismatch <= 3:
                print("  mismatch:", path, body.get("steering"), r[1], want)
    steered = sum(1 for _, b, _ in reqs if b.get("steering"))
    print(f"load: 8 clients x 25 requests in {dt:.1f} s ({len(expected)} distinct, "
          f"{steered} steered), {errors} errors, {mismatch} differ from the request alone")
    check(errors == 0, f"load: {errors} requests failed")
    check(mismatch == 0, f"load: {mismatch} responses differ from the same request alone")


def test_timeout(binary, model, sae):
    s = Server(binary, model, sae, "--timeout", "0.02", "--parallel", "1")
    try:
        st, o = s.post("/v1/completions", completion("Once upon a time", 120))
        check(st == 504 and o["error"]["type"] == "timeout", f"timeout: want 504, got {st} {o}")
        st, text, fin, ev, done, err = s.stream("/v1/completions",
                                                completion("Once upon a time", 120))
        check(st == 200 and done and err and err["type"] == "timeout" and fin is None,
              f"a stream past its timeout ends with an error event: {err} {fin} {done}")
        st, o = s.post("/v1/features", {"text": "Hi"})
        check(st in (200, 504), f"after a timeout the server answers ({st})")
    finally:
        check(s.stop() == 0, "exit status after SIGTERM")


def test_chat_template(binary, model, sae):
    """--chat-template chatml: a chat is the template's text (llama_chat_apply_template) plus the
    assistant prefix, so it generates what a completion of that text does; an unknown template
    name stops the server at start (exit 2)."""
    r = subprocess.run([binary, "-m", model, "--port", "0", "--chat-template", "no-such"],
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 2 and "does not know" in r.stderr,
          f"an unknown --chat-template: exit {r.returncode} {r.stderr[-200:]}")
    s = Server(binary, model, sae, "--chat-template", "chatml")
    try:
        text = "<|im_start|>user\nOnce upon a time<|im_end|>\n<|im_start|>assistant\n"
        st, a = s.post("/v1/chat/completions", chat("Once upon a time", 20))
        st2, b = s.post("/v1/completions", completion(text, 20))
        check(st == 200 and st2 == 200 and gen_text(a, True) == gen_text(b, False)
              and a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"],
              f"chatml chat = completion of its text: {a} {b}")
    finally:
        check(s.stop() == 0, "exit status after SIGTERM")


def test_queue_full(binary, model, sae):
    """One sequence and a queue of one: of 8 requests sent at once, at most two are held (one
    running, one waiting) and the others get 429; the server then serves again."""
    s = Server(binary, model, sae, "--parallel", "1", "--queue", "1")
    try:
        out = [None] * 8

        def one(i):
            out[i] = s.post("/v1/completions", completion("Once upon a time", 120))[0]

        ths = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(120)
        check(out.count(429) >= 1 and out.count(200) >= 1 and
              out.count(200) + out.count(429) == 8, f"a full queue answers 429: {out}")
        st, o = s.post("/v1/completions", completion("Once upon a time", 8))
        check(st == 200, "the request after 429s succeeds")
    finally:
        check(s.stop() == 0, "exit status after SIGTERM")


def test_sigterm(binary, model, sae, reference):
    s = Server(binary, model, sae, "--parallel", "2")
    body = completion("Once upon a time", 30)
    opened = []
    for k in range(4):  # two in slots, two waiting in the queue
        c = s.conn()
        path = "/v1/chat/completions" if k % 2 else "/v1/completions"
        b = chat("Once upon a time", 30) if k % 2 else body
        c.request("POST", path, body=json.dumps(dict(b, stream=True)),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r2, c2, text, ev = read_stream(r, c, k % 2 == 1, first_only=True)
        opened.append((r, c, k % 2 == 1, text))
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:  # no new connection once SIGTERM arrived
        c = s.conn()
        c.request("GET", "/health")
        c.getresponse().read()
        check(False, "a new request after SIGTERM was served")
    except OSError:
        pass
    for r, c, is_chat, head in opened:
        st, text, fin, ev, done, err = read_stream(r, c, is_chat)
        full = head + text
        check(done and fin == "length" and full == reference and err is None,
              f"a stream started before SIGTERM ends whole: {full!r} {fin} {done} {err}")
    rc = s.proc.wait(30)
    s.t.join(5)
    check(rc == 0, f"sae-server exits 0 after SIGTERM (rc {rc})")
    lines = [l for l in s.log if " /v1/" in l]
    check(len(lines) == 4 and all(" 200 " in l for l in lines),
          f"one log line per request: {lines}")


def main():
    a = sys.argv[1:]
    if len(a) < 3:
        raise SystemExit(__doc__)
    binary, model, sae = a[:3]
    ref = a[a.index("--reference") + 1] if "--reference" in a else None
    tool = a[a.index("--sae-llama-cpp") + 1] if "--sae-llama-cpp" in a else None
    node = a[a.index("--openai-node") + 1:a.index("--openai-node") + 3] if "--openai-node" in a \
        else None
    t0 = time.time()
    s = Server(binary, model, sae, "--parallel", "4", "--max-tokens", "120")
    try:
        phases = [time.time()]
        test_endpoints(s)
        text = test_generation(s)
        if ref:
            test_reference(s, ref)
        phases.append(time.time())
        test_steering(s, text)
        test_features(s)
        phases.append(time.time())
        test_bad_inputs(s)
        phases.append(time.time())
        test_load(s)
        phases.append(time.time())
        print("phases (s): generation %.1f, steering+features %.1f, bad inputs %.1f, load %.1f"
              % tuple(b - a for a, b in zip(phases, phases[1:])))
        if node:
            r = subprocess.run(["node", node[0], f"http://127.0.0.1:{s.port}/v1", text[:40]],
                               env=dict(os.environ, NODE_PATH=node[1]), capture_output=True,
                               text=True, timeout=120)
            print(r.stdout, end="")
            check(r.returncode == 0, f"the npm openai client: {r.stderr}")
    finally:
        rc = s.stop()
    check(rc == 0, f"exit status {rc}")
    check(len([l for l in s.log if "Z 127.0.0.1 " in l]) > 200, "a log line per request")
    t1 = time.time()
    test_timeout(binary, model, sae)
    test_queue_full(binary, model, sae)
    test_chat_template(binary, model, sae)
    if tool:
        test_against_sae_llama_cpp(binary, model, sae, tool)
    t2 = time.time()
    test_sigterm(binary, model, sae, text)
    print(f"main server {t1 - t0:.1f} s, timeout and full queue {t2 - t1:.1f} s, SIGTERM "
          f"{time.time() - t2:.1f} s")
    print(f"test_server: {len(FAILS)} failure(s) in {time.time() - t0:.1f} s")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
