"""File size and time until interactive of the `qkvtrace view` page at 1,000, 10,000 and 100,000 points, in headless
Chromium (the README's figures). Not a test: run `python tests/explorer_timing.py [N ...]`.

The table is synthetic: one site, layer and head, kinds q and k, epochs 1, 15 and 30, 16-wide random vectors (the
page's cost depends on the number of points, not on their values). PCA only: UMAP and t-SNE of 100,000 points take
many minutes on two cores. Time until interactive = `performance.now()` when the first draw has finished and the
click handler is attached (the page sets `window.qkvReady`), i.e. milliseconds since navigation began; redraw =
the mean time of one epoch-slider step (filter, hover texts, Plotly.react).
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def synthetic_table(n: int, dim: int = 16, seed: int = 0):
    from qkvtrace.table import VectorTable

    words = ("we", "want", "to", "eat", "apple")
    per_sentence = 3 * 2 * len(words)
    rows = []
    for s in range(-(-n // per_sentence)):
        for epoch in (1, 15, 30):
            for pos, word in enumerate(words):
                for kind in ("q", "k"):
                    rows.append((epoch, s, f"sentence {s}", pos, word, kind))
    rows = rows[:n]
    cols = list(zip(*rows))
    meta = {"epoch": np.array(cols[0], dtype=np.int64), "sentence_id": np.array(cols[1], dtype=np.int64),
            "sentence": np.array(cols[2], dtype=object), "side": np.full(n, "src", dtype=object),
            "position": np.array(cols[3], dtype=np.int64), "token": np.array(cols[4], dtype=object),
            "transition": np.full(n, "", dtype=object), "site": np.full(n, "encoder.self", dtype=object),
            "layer": np.zeros(n, dtype=np.int64), "head": np.full(n, "0", dtype=object),
            "kind": np.array(cols[5], dtype=object),
            "label": np.array([f"{w}@{k}@{e}" for e, _, _, _, w, k in rows], dtype=object),
            "dim": np.full(n, dim, dtype=np.int64)}
    return VectorTable(meta, np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32))


def main(sizes=(1_000, 10_000, 100_000), repeats=3):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from test_browser import CHROMEDRIVER, CHROMIUM, FLAGS
    from qkvtrace.web import explorer_page

    out = Path(tempfile.mkdtemp())
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={out / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(120)
    print("points  write_s  MB     time_to_interactive_ms (each run)  drawn    redraw_ms")
    try:
        for n in sizes:
            table = synthetic_table(n)
            t0 = time.perf_counter()
            page = explorer_page(table, out / f"explorer-{n}.html", methods=["pca"])
            write_s = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                driver.get("about:blank")
                driver.get(page.as_uri())
                while driver.execute_script("return window.qkvReady") is None:
                    time.sleep(0.05)
                times.append(driver.execute_script("return window.qkvReady"))
            # one interaction: the epoch slider to the first epoch and back, each a full redraw
            redraw = driver.execute_async_script("""
                const done = arguments[arguments.length - 1], e = document.getElementById('epoch');
                const t = performance.now();
                e.value = 1; draw().then(() => { e.value = 0; return draw(); })
                  .then(() => done((performance.now() - t) / 2));""")
            drawn = driver.execute_script(
                "return document.getElementById('figure')._fullData.filter(t => t.meta && t.meta.role === 'points')"
                ".reduce((s, t) => s + t._length, 0)")
            print(f"{n:>7,}  {write_s:6.1f}  {page.stat().st_size / 1e6:5.1f}  "
                  f"{' '.join(f'{t:7.0f}' for t in times)}  {drawn:,}  {redraw:7.0f}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or (1_000, 10_000, 100_000))
