#!/usr/bin/env python3
"""The sae-llama pipeline, end to end and small (examples/llama, examples/demo).

    test_demo.py pipeline BIN_DIR DATA_DIR WORK_DIR
        the engine's greedy continuations equal reference.json's; collect -> train -> browse ->
        steer on stories260K; the SAE's held-out FVU < 0.3; the browser's pages exist and every
        local link resolves, with nothing fetched from a network; clamping the chosen feature
        raises the frequency of its top words.
    test_demo.py chromium WORK_DIR
        renders the index and a feature page in headless Chromium to screenshots; fails on a
        blank page or any console message of level warning or error.

Standard library only. Exit status 0 on success; what failed is printed.
"""
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import urllib.parse
import zlib

FAILURES = []


def check(ok, what):
    print(("ok      " if ok else "FAILED  ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


def run(cmd, **kw):
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       errors="replace", **kw)
    print(p.stdout, end="", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"FAILED: {cmd[0]} {cmd[1] if len(cmd) > 1 else ''} exited with "
                         f"{p.returncode}")
    return p.stdout


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.refs.append((tag, name, value))


def check_browser(folder):
    index = os.path.join(folder, "index.html")
    check(os.path.isfile(index), f"{index} exists")
    pages = sorted(f for f in os.listdir(folder) if f.endswith(".html"))
    check(len(pages) > 1, f"{len(pages)} pages in {folder}")
    broken, remote, n_links = [], [], 0
    for page in pages:
        parser = Links()
        with open(os.path.join(folder, page), encoding="utf-8") as f:
            parser.feed(f.read())
        for tag, attr, ref in parser.refs:
            url = urllib.parse.urlparse(ref)
            if url.scheme or url.netloc:
                remote.append(f"{page}: <{tag} {attr}={ref}>")
                continue
            n_links += 1
            target = os.path.normpath(os.path.join(folder, urllib.parse.unquote(url.path)))
            if url.path and not os.path.isfile(target):
                broken.append(f"{page}: {ref}")
    check(n_links > len(pages), f"{n_links} local links found")
    check(not broken, "every local link resolves" + (f" (broken: {broken[:5]})" if broken else ""))
    check(not remote, "nothing is fetched from elsewhere" + (f" ({remote[:5]})" if remote else ""))


def pipeline(bin_dir, data_dir, work):
    model = os.path.join(data_dir, "stories260K")
    exe = os.path.join(bin_dir, "sae-llama")
    generate = os.path.join(bin_dir, "generate")

    # 1. the engine reproduces llama2.c's greedy continuations
    with open(os.path.join(model, "reference.json"), encoding="utf-8") as f:
        ref = json.load(f)
    for case in ref["cases"]:
        n_new = len(case["greedy_tokens"]) - len(case["prompt_tokens"])
        out = subprocess.run([generate, os.path.join(model, "model.bin"),
                              os.path.join(model, "tok512.bin"), "-i", case["prompt"],
                              "-n", str(n_new)], stdout=subprocess.PIPE, text=True, check=True)
        check(out.stdout.rstrip("\n") == case["greedy_text"],
              f"greedy continuation of {case['prompt']!r} equals reference.json")

    # 2. the pipeline, small
    shutil.rmtree(work, ignore_errors=True)
    run([exe, "collect", model, work, "--stories", "120", "--tokens", "160"])
    # The steering checks below were calibrated on an SAE trained at the former default rate
    # (2e-4 sqrt(2^14 / 256) = 0.0016); today's default (0.0125, docs/training.md) trains a
    # better SAE (held-out FVU 0.09 against 0.13) whose name features differ: pin the rate.
    out = run([exe, "train", work, "--width", "256", "--steps", "400", "--batch", "512",
               "--lr", "0.0016"])
    fvu = float(re.search(r"FVU on \d+ held-out tokens: ([0-9.]+)", out).group(1))
    check(fvu < 0.3, f"held-out FVU {fvu:.4f} < 0.3")
    out = run([exe, "browse", work])
    check(re.search(r"open file://\S+index\.html", out) is not None, "browse prints the page")
    check_browser(os.path.join(work, "browser"))
    # 10x the max, as "Scaling Monosemanticity" clamps: on this model a strong, robust effect
    # (the demo's default 2x keeps the stories more readable but moves less)
    out = run([exe, "steer", work, "--stories", "16", "--tokens", "120", "--multiple", "10"])
    rates = [float(x) for x in re.findall(r"= +([0-9.]+) per 1000 words", out)]
    check(len(rates) == 2 and rates[1] > 2 * rates[0],
          f"clamping at least doubles its top words' frequency ({rates})")
    check("--- steered" in out and "--- unsteered" in out, "steer prints both stories")


def png_pixels(path):
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, "unexpected PNG layout"
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), w * bpp, [], bytearray(w * bpp)
    for y in range(h):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line[j] for j in range(stride) if j % bpp < 3))
        prev = line
    return w, h, rows


def chromium(work):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("FAILED: chromium is not installed (cmake/install-deps.sh installs it)")
    folder = os.path.join(work, "browser")
    pages = ["index.html"] + sorted(f for f in os.listdir(folder) if f.startswith("feature-"))[:1]
    for page in pages:
        shot = os.path.join(work, page.replace(".html", ".png"))
        with tempfile.TemporaryDirectory() as profile:
            if os.path.exists(shot):
                os.remove(shot)
            p = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--user-data-dir=" + profile,
                 "--enable-logging=stderr", "--v=0", "--window-size=1100,1400",
                 "--screenshot=" + shot, "file://" + os.path.abspath(os.path.join(folder, page))],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                timeout=120)
        # Chromium logs the page's console as "...:CONSOLE(line)] message"; anything the page
        # logs is a failure, as is a script or resource error.
        console = [l for l in p.stdout.splitlines() if "CONSOLE" in l or "Uncaught" in l]
        check(p.returncode == 0 and os.path.isfile(shot), f"chromium rendered {page} to {shot}")
        check(not console, f"no console messages on {page}" + (f": {console[:3]}" if console else ""))
        if not os.path.isfile(shot):
            continue
        w, h, rows = png_pixels(shot)
        dark = sum(1 for row in rows for i in range(0, len(row), 3) if row[i] + row[i + 1] + row[i + 2] < 384)
        colours = len({row[i:i + 3] for row in rows[::8] for i in range(0, len(row), 24)})
        check(dark > w * h // 500 and colours > 8,
              f"{page} is not blank ({dark} dark pixels of {w * h}, {colours} colours)")


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "pipeline":
        pipeline(*sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "chromium":
        chromium(sys.argv[2])
    else:
        raise SystemExit(__doc__)
    if FAILURES:
        raise SystemExit(f"{len(FAILURES)} check(s) failed")
    print("all checks passed")


if __name__ == "__main__":
    main()
