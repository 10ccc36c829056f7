"""The interactive pages in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
selenium, with networking off. One browser per module; small tables.

Locally these tests skip when no browser is installed; with CI=true a missing browser fails them.
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import shutil
import time

import numpy as np
import pytest

from test_plot import make_table

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900",
         # nothing may be fetched: every connection goes to a closed port and no name resolves
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"no browser for the page tests: {', '.join(missing)} missing (apt-get install chromium " \
                 "chromium-driver; pip install selenium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(driver, path, ready="return document.getElementById('figure') && "
                                  "document.getElementById('figure')._fullLayout !== undefined"):
    driver.get(path.resolve().as_uri())
    deadline = time.time() + 60
    while not driver.execute_script(ready):
        assert time.time() < deadline, f"{path.name} did not become ready"
        time.sleep(0.1)
    driver.get_log("browser")  # start each page with an empty console


def errors(driver) -> list[str]:
    """Console errors and failed loads since the last call (warnings, e.g. WebGL performance notes, pass)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def js(driver, script, *args):
    return driver.execute_script("const gd = document.getElementById('figure');\n" + script, *args)


DRAWN = "return gd._fullData.filter(t => t.meta && t.meta.role === arguments[0] && t.visible === true)" \
        ".reduce((n, t) => n + t._length, 0)"


def pixel(driver, row_index):
    """Where the point whose customdata (or its last item) is `row_index` is drawn: offsets from the centre of the
    figure element, for ActionChains. In a 3-D scene the camera's model, view and projection matrices place it, as
    plotly places its 3-D annotations."""
    return js(driver, """
        const want = arguments[0], L = gd._fullLayout, size = L._size, r = gd.getBoundingClientRect();
        const mul = (M, v) => { const o = [0, 0, 0, 0];
          for (let i = 0; i < 4; ++i) for (let j = 0; j < 4; ++j) o[j] += M[4 * i + j] * v[i]; return o; };
        for (const t of gd._fullData) {
          if (!t.meta || t.meta.role !== 'points') continue;
          for (let j = 0; j < t._length; j++) {
            const c = t.customdata[j], row = Array.isArray(c) ? c[c.length - 1] : c;
            if (row !== want) continue;
            if (t.type !== 'scatter3d')
              return [L.xaxis.l2p(t.x[j]) + size.l - r.width / 2, L.yaxis.l2p(t.y[j]) + size.t - r.height / 2];
            const scene = L.scene._scene, dom = L.scene.domain, s = scene.dataScale, cp = scene.glplot.cameraParams;
            const p = mul(cp.projection, mul(cp.view, mul(cp.model, [t.x[j] * s[0], t.y[j] * s[1], t.z[j] * s[2], 1])));
            const x = size.l + dom.x[0] * size.w + 0.5 * (1 + p[0] / p[3]) * size.w * (dom.x[1] - dom.x[0]);
            const y = size.t + (1 - dom.y[1]) * size.h + 0.5 * (1 - p[1] / p[3]) * size.h * (dom.y[1] - dom.y[0]);
            return [x - r.width / 2, y - r.height / 2];
          }
        }
        return null;""", row_index)


def hover_text(driver, row_index, wait: float = 10) -> str:
    """Move the mouse onto the point of `row_index` and return the hover card's text ('' if none shows within
    `wait` seconds)."""
    from selenium.webdriver.common.action_chains import ActionChains

    dx, dy = pixel(driver, row_index)
    figure = driver.find_element("id", "figure")
    ActionChains(driver).move_to_element_with_offset(figure, int(round(dx)), int(round(dy))).perform()
    deadline = time.time() + wait
    while time.time() < deadline:  # a 3-D scene picks the point under the mouse when it next redraws
        text = js(driver, "return Array.from(document.querySelectorAll('.hovertext'))"
                          ".map(h => h.textContent).join('|')")
        if text:
            return text
        time.sleep(0.1)
    return ""


# --- the scatter of `plot --out x.html` ---

@pytest.fixture(scope="module")
def scatter_pages(tmp_path_factory):
    from qkvtrace.cli import main

    d = tmp_path_factory.mktemp("scatter")
    table = make_table(epochs=(1, 15, 30), n_sentences=2, words=("we", "eat", "apple"))
    table.save(d / "vectors")
    for dims in (2, 3):
        try:
            main(["plot", str(d / "vectors"), "--dims", str(dims), "--trajectories", "--out",
                  str(d / f"scatter{dims}.html")])
        except SystemExit as e:
            assert e.code in (0, None)
    from qkvtrace.plot import format_labels

    return d, table, format_labels(table)


@pytest.mark.parametrize("dims", [2, 3])
def test_scatter_page_draws_every_row_offline(browser, scatter_pages, dims):
    d, table, _ = scatter_pages
    open_page(browser, d / f"scatter{dims}.html")
    assert js(browser, DRAWN, "points") == len(table)
    assert js(browser, "return gd._fullData.filter(t => t.meta && t.meta.role === 'trajectory').length") == 2
    assert errors(browser) == []


def test_scatter_page_hover_slider_and_legend(browser, scatter_pages):
    from selenium.webdriver.common.action_chains import ActionChains

    d, table, labels = scatter_pages
    open_page(browser, d / "scatter2.html")
    # hovering a point shows its card with its label
    row = 7
    assert labels[row] in hover_text(browser, row)
    # a legend click hides the whole group: both kinds and the trajectory of sentence 0
    browser.find_elements("css selector", ".legend .traces")[0].click()
    time.sleep(0.5)
    hidden = js(browser, "return gd._fullData.filter(t => t.visible === 'legendonly').map(t => t.legendgroup)")
    assert set(hidden) == {"sentence 0"} and len(hidden) == 3
    browser.find_elements("css selector", ".legend .traces")[0].click()  # and shows it again
    time.sleep(0.5)
    assert js(browser, "return gd._fullData.every(t => t.visible === true)")
    # moving the epoch slider to "1" draws epoch 1's points only, elsewhere than "all" drew them
    before = js(browser, "return gd._fullData.filter(t => t.meta.role === 'points').map(t => Array.from(t.x))")
    tick = browser.find_elements("css selector", ".slider-container .slider-tick-rect")
    rail = browser.find_element("css selector", ".slider-container .slider-rail-touch-rect")
    # ticks are drawn left to right for the steps all, 1, 15, 30: press the rail under the second one
    x = tick[1].location["x"] + tick[1].size["width"] / 2 - (rail.location["x"] + rail.size["width"] / 2)
    ActionChains(browser).move_to_element_with_offset(rail, int(x), 0).click().perform()
    deadline = time.time() + 10
    while js(browser, "return gd.layout.sliders[0].active") != 1 and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    after = js(browser, "return gd._fullData.filter(t => t.meta.role === 'points').map(t => Array.from(t.x))")
    assert js(browser, "return gd.layout.sliders[0].active") == 1
    assert sum(map(len, after)) == len(table) // 3 and after != before
    assert js(browser, "return gd._fullData.filter(t => t.meta.role === 'points')"
                       ".every(t => Array.from(t.customdata).every(c => c[6] === 1))")
    assert errors(browser) == []


def test_scatter_page_3d_hover_card(browser, scatter_pages):
    d, table, labels = scatter_pages
    open_page(browser, d / "scatter3.html")
    # a card shows within 0.3 s when it shows at all; a hidden point (4 of these 12) waits out `wait`
    cards = {row: hover_text(browser, row, wait=0.5) for row in range(0, len(table), 3)}
    # a point can hide behind another or behind an arrow cone; most points show their own card
    own = [row for row, text in cards.items() if text.startswith(labels[row] + "word")]
    if len(own) < 2 * len(cards) // 3:  # a slow machine: the others again, given time to redraw
        cards.update({row: hover_text(browser, row, wait=3) for row in cards if row not in own})
        own = [row for row, text in cards.items() if text.startswith(labels[row] + "word")]
    assert len(own) >= 2 * len(cards) // 3, cards
    for row in own:  # and the card reads the point's own row: word, kind, site, layer, epoch, position, token
        m = {c: table.meta[c][row] for c in ("word", "kind", "site", "layer", "epoch", "position", "token")
             if c in table.meta}
        text = cards[row]
        assert f"kind {m['kind']}" in text and f"{m['site']} · layer {m['layer']}" in text
        assert f"epoch {m['epoch']}" in text and f"position {m['position']} · token {m['token']}" in text
    assert errors(browser) == []


# --- the explorer of `qkvtrace view` ---

@pytest.fixture(scope="module")
def explorer(tiny_run, tmp_path_factory):
    from qkvtrace.cli import main
    from qkvtrace.extract import extract

    d = tmp_path_factory.mktemp("explorer")
    sentences = ["we want to eat apple", "we want to eat bread", "i can eat bread", "we can eat apple",
                 "i can drink water"]
    table = extract(tiny_run, sentences, sites=["encoder.self", "decoder.cross"], kinds=["q", "k", "v"], layers=0,
                    heads="all", out=d / "vectors")
    try:
        main(["view", str(d / "vectors"), "--methods", "pca", "--neighbours", "4"])
    except SystemExit as e:
        assert e.code in (0, None)
    return d, table


def test_explorer(browser, explorer):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    from qkvtrace.project import cosine_matrix

    d, table = explorer
    open_page(browser, d / "vectors" / "explorer.html", ready="return window.qkvReady !== undefined")
    meta = table.meta
    space = (meta["site"] == "encoder.self") & (meta["layer"] == 0) & (meta["head"] == "0")
    # every row of the first site, layer and head, all kinds and epochs
    assert js(browser, DRAWN, "points") == space.sum()
    # hovering a point shows its label
    row = int(np.flatnonzero(space)[5])
    assert meta["label"][row] in hover_text(browser, row)
    # the epoch slider: one step right shows only the first epoch, at other coordinates than "all" had
    before = js(browser, "return Array.from(gd._fullData[0].x)")
    browser.find_element("id", "epoch").send_keys(Keys.ARROW_RIGHT)
    time.sleep(0.5)
    first = space & (meta["epoch"] == meta["epoch"].min())
    assert js(browser, DRAWN, "points") == first.sum()
    assert js(browser, "return Array.from(gd._fullData[0].x)") != before
    browser.find_element("id", "epoch").send_keys(Keys.HOME)
    time.sleep(0.3)
    # search: the points whose word is "eat" (or whose label contains it) are ringed
    browser.find_element("id", "search").send_keys("eat")
    time.sleep(0.5)
    eat = space & np.array(["eat" in str(lab).lower() or tok == "eat" for lab, tok in zip(meta["label"], meta["token"])])
    assert js(browser, DRAWN, "search") == eat.sum() > 0
    ringed = set(js(browser, "return Array.from(gd._fullData.find(t => t.meta && t.meta.role === 'search')"
                             ".customdata)"))
    assert ringed == set(np.flatnonzero(eat).tolist())
    assert browser.find_element("id", "matches").text == f"{eat.sum()} matches"
    # clicking a point lists its nearest neighbours by cosine (same kind and epoch) and its attention row
    browser.find_element("id", "search").clear()
    target = int(np.flatnonzero(space & (meta["kind"] == "q"))[3])
    dx, dy = pixel(browser, target)
    ActionChains(browser).move_to_element_with_offset(browser.find_element("id", "figure"), int(round(dx)),
                                                      int(round(dy))).click().perform()
    deadline = time.time() + 10
    while not browser.find_elements("css selector", "#neighbours li") and time.time() < deadline:
        time.sleep(0.1)
    items = browser.find_elements("css selector", "#neighbours li")
    same = np.flatnonzero(space & (meta["kind"] == "q") & (meta["epoch"] == meta["epoch"][target]))
    cos = cosine_matrix(table.X[[target], :int(meta["dim"][target])], table.X[same, :int(meta["dim"][target])])[0]
    cos[same == target] = -np.inf
    best = same[cos == cos.max()]  # equal vectors (layer 0, same word and position) tie
    assert len(items) == 4 and int(items[0].get_attribute("data-row")) in best
    side = browser.find_element("id", "side").text
    assert meta["sentence"][target] in side and "attention of this query over the keys" in side
    assert errors(browser) == []


def test_attention_page(browser, tiny_run, tmp_path):
    from qkvtrace.compare import attention

    pats = attention(tiny_run, "i can eat apple", site="decoder.cross", layer=0)
    path = pats.save(tmp_path / "attention.html")
    open_page(browser, path)
    heatmaps = js(browser, "return gd._fullData.filter(t => t.type === 'heatmap').length")
    assert heatmaps == len(pats.epochs) * tiny_run.model_cfg.n_heads
    assert js(browser, "return gd._fullData[0].z.length") == len(pats.query_tokens)
    assert errors(browser) == []
