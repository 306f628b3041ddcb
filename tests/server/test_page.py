#!/usr/bin/env python3
"""sae-server's page (GET /, examples/server/page.html) driven by headless Chromium.

usage: test_page.py [BUILD_DIR] [--model GGUF] [--sae PATH] [--data DIR] [--screenshot PNG]

The arguments and programs are found as test_cards.py finds them (its setup() and tools():
tests/server/run.sh's environment, then examples/llama.cpp/prepare.sh); sae-server is
$SAE_SERVER or BUILD_DIR's. The test makes a
statistics file (a capture of 12000 tokens of stories260K's texts), starts sae-server on a free
localhost port, and drives the page the way a person would, through Chromium's DevTools protocol
over --remote-debugging-pipe (JSON messages on two pipes: no WebSocket, standard library only):
  types a prompt, presses "Show features", clicks a token, picks its strongest feature; the card
  opens (a histogram drawn as SVG bars, one per bin, top contexts, promoted tokens) and the
  prompt's tokens are shaded by the feature's values from /v1/features; moves the clamp slider
  to its end with the keyboard and presses "Generate both": the steered text differs from the
  unsteered one, and each equals the same request sent to the server directly; a feature out of
  range shows the server's message in the card; nothing is logged to the console.
--screenshot saves the page at that moment (docs/images/server.png is made this way).
Exit 0 when everything holds, 1 otherwise.
"""
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HOOK = os.environ.get("SAE_HOOK") or "blocks.2.hook_resid_pre"
PROMPT = "Once upon a time, there was a little girl named Lily. She liked to play"
fails = 0


def check(ok, what):
    global fails
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        fails += 1
    return ok


class Chromium:
    """A headless Chromium spoken to over --remote-debugging-pipe: the browser reads
    NUL-terminated JSON commands on its fd 3 and writes replies and events on its fd 4."""

    def __init__(self, binary, width=1280, height=1180):
        self.profile = tempfile.mkdtemp(prefix="libsae-page-")
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()

        def fds():
            a, b = os.dup(to_r), os.dup(from_w)  # out of the way of 3 and 4 first
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--user-data-dir=" + self.profile,
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self.buf, self.next_id, self.events, self.session = b"", 0, [], None
        self.size = (width, height)

    def call(self, method, params=None, timeout=30):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        end = time.time() + timeout
        while time.time() < end:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                j = json.loads(raw)
                if j.get("id") == self.next_id:
                    if "error" in j:
                        raise RuntimeError(f"{method}: {j['error']}")
                    return j.get("result", {})
                if "method" in j:
                    self.events.append(j)
            chunk = os.read(self.from_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its pipe")
            self.buf += chunk
        raise RuntimeError(f"{method}: no answer in {timeout} s")

    def open(self, url):
        t = self.call("Target.createTarget", {"url": "about:blank"})
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": t["targetId"], "flatten": True})["sessionId"]
        for domain in ("Runtime", "Page", "Log"):
            self.call(domain + ".enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": self.size[0],
                  "height": self.size[1], "deviceScaleFactor": 1, "mobile": False})
        self.call("Page.navigate", {"url": url})

    def js(self, expr):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def wait(self, expr, what, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")

    def click(self, selector):
        """A real mouse click at the centre of the first element matching selector."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                      "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                                    "button": "left", "clickCount": 1})

    def key(self, name, code):
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": name, "code": name,
                                                  "windowsVirtualKeyCode": code})

    def console(self):
        """Console messages, uncaught exceptions and browser log entries (warnings and up)."""
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled":
                out.append(f"console.{p.get('type')}")
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("warning", "error"):
                out.append("log: " + p["entry"]["text"])
        return out

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.to_w)
        os.close(self.from_r)
        shutil.rmtree(self.profile, ignore_errors=True)


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def main():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        print("test_page: SKIP: chromium is not installed (cmake/install-deps.sh installs it)")
        return 77
    sys.path.insert(0, HERE)
    import test_cards
    a = test_cards.setup(sys.argv[1:], "the page in headless Chromium")
    t = test_cards.tools(a, ["sae-llama-capture", "sae-server-stats"] +
                         ([] if os.environ.get("SAE_SERVER") else ["sae-server"]))
    server_bin = os.environ.get("SAE_SERVER") or t["sae-server"]
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    work = tempfile.mkdtemp(prefix="libsae-test-page-")
    server = chrome = None
    try:
        cap, stats = os.path.join(work, "capture"), os.path.join(work, "stats.json")
        subprocess.run([t["sae-llama-capture"], "-m", a.model, "--hooks", HOOK,
                        "--corpus", os.path.join(a.data, "stories260K", "stories.txt"), "-o", cap,
                        "--max-tokens", "12000", "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([t["sae-server-stats"], "--capture", cap, "--hook", HOOK,
                        "--sae", a.sae, "-o", stats], check=True, stdout=subprocess.DEVNULL)
        server = subprocess.Popen([server_bin, "-m", a.model, "--sae",
                                   f"{HOOK}={a.sae}", "--stats", f"{HOOK}={stats}", "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = server.stdout.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not check(port is not None, f"sae-server is listening: {line.strip()}"):
            return 1
        port = int(port.group(1))
        chrome = Chromium(browser)
        drive(chrome, port, a.screenshot)
    finally:
        if chrome:
            chrome.close()
        if server:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"test_page: {'all passed' if not fails else f'{fails} FAILED'}")
    return 1 if fails else 0


def drive(c, port, screenshot):
    c.open(f"http://127.0.0.1:{port}/")
    c.wait("document.querySelectorAll('#hook option').length > 0", "the hooks")
    check(c.js("document.getElementById('hook').value") == HOOK, "the page lists the hook")

    # type the prompt
    c.js("(() => { const t = document.getElementById('prompt'); t.value = ''; t.focus(); })()")
    c.call("Input.insertText", {"text": PROMPT})
    check(c.js("document.getElementById('prompt').value") == PROMPT, "the prompt is typed")
    c.click("#analyze")
    c.wait("document.querySelectorAll('#tokens .tok').length > 0", "the prompt's tokens")
    texts = c.js("[...document.querySelectorAll('#tokens .tok')].map(e => e.textContent)")
    check("".join(texts).startswith("<s> Once upon a time,"), f"{len(texts)} tokens shown")

    # click " Lily" and pick its strongest feature
    idx = next(i for i, t in enumerate(texts) if "Lily" in t)
    c.click(f"#tokens .tok:nth-child({idx + 1})")
    c.wait("document.querySelectorAll('#token-info button.chip').length > 0",
           "the token's features")
    first = c.js("document.querySelector('#token-info button.chip b').textContent")
    feat = int(first.lstrip("#"))
    c.click("#token-info button.chip")
    c.wait(f"document.getElementById('feature').value === '{feat}' && "
           f"document.querySelector('#card .stats b') && "
           f"document.querySelector('#card .stats b').textContent === '#{feat}'", "the card")
    direct = post(port, "/v1/features", {"text": PROMPT, "top_k": 1,
                                          "features": [{"hook": HOOK, "feature": feat}]})
    want = [t["values"][0] for t in direct["tokens"]]
    check(direct["tokens"][idx]["features"][HOOK][0]["id"] == feat,
          f"the chip picked is the token's strongest feature (#{feat})")
    c.wait("document.querySelectorAll('#tokens .tok').length > 0 && "
           "[...document.querySelectorAll('#tokens .tok')]"
           ".every(e => e.dataset.value !== undefined)",
           "the shading")
    time.sleep(0.5)  # the re-shading request after the pick
    got = c.js("[...document.querySelectorAll('#tokens .tok')].map(e => Number(e.dataset.value))")
    shaded = c.js("[...document.querySelectorAll('#tokens .tok')].map(e => e.style.background)")
    check(got == want,
          "each token's shade comes from the feature's value there (/v1/features)")
    check(all((v > 0) == (s not in ("", "transparent")) for v, s in zip(want, shaded))
          and any(v > 0 for v in want), f"{sum(v > 0 for v in want)} tokens shaded, the others not")

    card = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{port}/v1/features/{HOOK}/{feat}", timeout=30).read())
    bars = c.js("document.querySelectorAll('#histogram rect.bar').length")
    heights = c.js("[...document.querySelectorAll('#histogram rect.bar')]"
                   ".map(r => Number(r.getAttribute('height')))")
    top = max(card["histogram"]["counts"])
    check(bars == len(card["histogram"]["counts"]) and
          all(abs(h - 92 * k / top) < 0.01 for h, k in zip(heights, card["histogram"]["counts"])),
          f"the histogram is drawn: {bars} SVG bars, heights proportional to the counts")
    ctx = c.js("document.querySelectorAll('#contexts .ctx').length")
    check(ctx == len(card["top_contexts"]) > 0, f"{ctx} top contexts shown")
    chips = c.js("[...document.querySelectorAll('#card .chips')].map(e => e.children.length)")
    check(chips == [len(card["promoted"]), len(card["suppressed"]), len(card["neighbors"])],
          f"promoted, suppressed and nearest features shown ({chips})")

    # the clamp slider to its end, by keyboard, then generate both
    c.js("document.getElementById('strength').focus()")
    c.key("End", 35)
    value = float(c.js("document.getElementById('strength').value"))
    slider_max = float(c.js("document.getElementById('strength').max"))
    check(value == slider_max > card["max"],
          f"the slider moved to its end: clamp {value} (the feature's max is {card['max']:.3f})")
    plan = c.js("document.getElementById('plan').textContent")
    check(plan.startswith(f"clamp #{feat} at {HOOK}"),
          "the plan shown follows the slider")
    c.js("document.getElementById('max-tokens').value = '40'")
    c.click("#generate")
    c.wait("document.getElementById('steer-panel').dataset.done", "the two completions", 120)
    unsteered = c.js("document.querySelector('#unsteered .out').textContent")
    steered = c.js("document.querySelector('#steered .out').textContent")
    check(unsteered and steered and unsteered != steered,
          f"steered text differs from unsteered:\n       unsteered: {unsteered!r}\n"
          f"       steered:   {steered!r}")
    base = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "seed": 1}
    u = post(port, "/v1/completions", base)["choices"][0]["text"]
    s = post(port, "/v1/completions", dict(base, steering=[{"hook": HOOK, "feature": feat,
                                                              "op": "clamp", "value": value}]))
    check(u == unsteered and s["choices"][0]["text"] == steered,
          "each equals the same request sent to the server directly")
    if screenshot:
        c.js("window.scrollTo(0, 0)")
        shot = c.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
        data = base64.b64decode(shot["data"])
        with open(screenshot + ".tmp", "wb") as f:
            f.write(data)
        os.replace(screenshot + ".tmp", screenshot)
        check(data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000,
              f"screenshot {screenshot} ({len(data)} bytes)")

    msgs = c.console()
    check(not msgs, "nothing on the console" + (f": {msgs[:3]}" if msgs else ""))

    # a feature out of range: the server's message in the card (the browser logs the failed
    # requests, and nothing else)
    c.events.clear()
    c.js("(() => { const f = document.getElementById('feature'); f.value = '100000';"
         "f.dispatchEvent(new Event('change')); })()")
    msg = c.wait("(() => { const t = document.getElementById('card').textContent;"
                 "return t.includes('out of range') ? t : ''; })()", "the error in the card")
    check("out of range" in msg, f"a feature out of range shows the server's message: {msg[:80]!r}")
    msgs = [m for m in c.console() if not re.search(r"Failed to load resource: .* 40[04]", m)]
    check(not msgs, "nothing else on the console" + (f": {msgs[:3]}" if msgs else ""))


if __name__ == "__main__":
    sys.exit(main())
