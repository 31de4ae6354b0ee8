"""The pages `dvc plots show` and `dvc plots diff` write, on a tiny pipeline run: every plot dvc.yaml declares
has data behind it, with no file reported missing whether or not the run held a validation split out, and the
page, opened with no network in headless Chromium, draws every chart.

The browser tests skip only outside CI where no Chromium binary exists (with CI=true they fail); a screenshot
of each page is saved under tests/artifacts/."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CLASSES
from dvc_render.base import Renderer
from dvcrepo import CURVES, REPO, copy_repo, dvc, env, run, set_params

ARTIFACTS = REPO / "tests" / "artifacts"
BROWSERS = ["chromium", "chromium-browser", "google-chrome"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000",
                  "--host-resolver-rules=MAP * ~NOTFOUND"]  # no name resolves: a page that needs a CDN fails here
RENDER_TIMEOUT_S = 60
CURVES_DIR = "metrics/train/plots/metrics"


def declared_plots():
    """dvc.yaml's plots: {id: definition} for the vega plots (dicts: files named in `y`, or a folder of curves),
    and the list of image paths."""
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    vega = {plot_id: spec for entry in plots if isinstance(entry, dict) for plot_id, spec in entry.items()}
    images = [entry for entry in plots if isinstance(entry, str)]
    return vega, images


def definition(plot_id):
    """The dvc.yaml definition a shown vega plot comes from: its own, or its folder's (one plot per file)."""
    vega, _ = declared_plots()
    return vega.get(plot_id) or next(spec for folder, spec in vega.items() if plot_id.startswith(folder + "/"))


def shown_plots(repo, *args):
    """`dvc plots show` or `dvc plots diff REV...` (args) with --json: {plot id: its renderers}. DVC lists a file
    it could not load (a missing one) under "errors" and says so on stderr: neither may happen."""
    result = subprocess.run([sys.executable, "-m", "dvc", "plots", *args, "--json"], cwd=repo, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    shown = json.loads(result.stdout)
    assert shown.get("errors", []) == [], shown["errors"]
    return shown["data"]


def revisions(renderers):
    """The revisions a vega plot draws, from its data."""
    return {datum["rev"] for datum in renderers[0]["content"]["data"]["values"]}


def encoded_fields(spec):
    """Every field an x or y channel of a Vega-Lite spec names, in any layer or facet."""
    fields = set()
    if isinstance(spec, dict):
        for channel in ("x", "y"):
            field = spec.get("encoding", {}).get(channel, {}).get("field")
            if field:
                fields.add(field)
        for value in spec.values():
            fields |= encoded_fields(value)
    elif isinstance(spec, list):
        for value in spec:
            fields |= encoded_fields(value)
    return fields


@pytest.fixture(scope="module")
def repo(trained_repo):
    """The tiny pipeline run and committed."""
    return trained_repo.repo


def check_data(shown):
    """Every vega plot has data, draws its fields (a curve file: its x and the column it is named for) and is titled
    by what it measures (a curve file: its path, e.g. .../validation/acc.tsv); every image plot is a PNG."""
    vega, images = declared_plots()
    for plot_id, renderers in shown.items():
        if plot_id in images:
            assert all(Path(r["url"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for r in renderers), plot_id
            continue
        declared, spec = definition(plot_id), renderers[0]["content"]
        values = spec["data"]["values"]
        assert values, f"{plot_id}: no data"
        y_fields = set(declared["y"].values()) if "y" in declared else {Path(plot_id).stem}
        assert {declared["x"]} | y_fields <= encoded_fields(spec), plot_id
        for field in encoded_fields(spec):
            assert all(field in datum for datum in values), f"{plot_id}: a datum lacks {field!r}"
        assert spec["title"]["text"] == plot_id, spec["title"]
        if len(declared.get("y", {})) > 1:  # each declared file contributes its own curve
            files = {datum["filename"] for datum in values}
            assert len(files) == len(declared["y"]), plot_id
            assert all(any(path.endswith(name) for name in files) for path in declared["y"]), (plot_id, files)


def test_every_declared_plot_has_data_and_its_fields(repo):
    shown = shown_plots(repo, "show")
    vega, images = declared_plots()
    assert set(shown) == ({f"{CURVES_DIR}/{name}.tsv" for name in CURVES} | set(vega) - {CURVES_DIR} | set(images))
    check_data(shown)


@pytest.fixture(scope="module")
def split_runs(trained_repo, tmp_path_factory):
    """trained_repo (every epoch scored on the test set, HEAD~1) and, committed on it, the same run holding 100
    training images out (HEAD): curves test/* in one revision, validation/* in the other."""
    repo = copy_repo(trained_repo.repo, tmp_path_factory.mktemp("split-runs") / "repo")
    set_params(repo, train__validation_images=100)
    dvc(repo, "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "a validation split")
    return repo


def test_a_run_with_a_validation_split_draws_its_validation_curves(split_runs):
    shown = shown_plots(split_runs, "show")
    curves = {plot_id for plot_id in shown if plot_id.startswith(CURVES_DIR)}
    assert curves == {f"{CURVES_DIR}/{name}.tsv" for name in ["train/loss", "train/acc", "validation/loss",
                                                               "validation/acc", "lr"]}
    check_data(shown)


def test_plots_diff_draws_runs_with_and_without_a_split_each_curve_where_it_has_it(split_runs):
    shown = shown_plots(split_runs, "diff", "HEAD~1", "HEAD")
    drawn = {plot_id: revisions(renderers) for plot_id, renderers in shown.items() if renderers[0]["type"] == "vega"}
    both = {"HEAD~1", "HEAD"}
    assert drawn == {**{f"{CURVES_DIR}/{name}.tsv": both for name in ["train/loss", "train/acc", "lr"]},
                     f"{CURVES_DIR}/test/loss.tsv": {"HEAD~1"}, f"{CURVES_DIR}/test/acc.tsv": {"HEAD~1"},
                     f"{CURVES_DIR}/validation/loss.tsv": {"HEAD"}, f"{CURVES_DIR}/validation/acc.tsv": {"HEAD"},
                     "per_class_accuracy": both, "confusion": both}
    check_data(shown)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through Selenium, with no network; skips only if no Chromium is installed."""
    binary = next(filter(None, map(shutil.which, BROWSERS)), None)
    if binary is None:
        reason = (f"no Chromium binary ({', '.join(BROWSERS)}) on PATH; install Debian's chromium and "
                  "chromium-driver, as .ci/run does")
        if os.environ.get("CI") == "true":  # CI must open the pages: a missing browser fails it
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path, f"{binary} is installed but chromedriver is not (Debian: apt-get install chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


# Per element with an id in arguments[0] (vega-embed replaces the script DVC put in it): whether it exists,
# what the template recorded (data-vega), its text, and its data marks that have a shape (role-mark groups:
# lines, rects, points, texts; not axes or legends).
CHARTS_JS = """
return arguments[0].map(id => [id, document.getElementById(id)]).map(([id, div]) => !div ? {id: id} : ({
        id: id,
        status: div.dataset.vega || null,
        text: div.innerText,
        svg: div.querySelectorAll("svg").length,
        texts: Array.from(div.querySelectorAll("svg text")).map(t => t.textContent),
        marks: Array.from(div.querySelectorAll("svg g.role-mark > path, svg g.role-mark > text"))
            .filter(m => (m.getAttribute("d") || m.textContent || "").trim() !== "").length,
        lines: div.querySelectorAll("svg g.mark-line.role-mark > path[d]").length,
        rects: div.querySelectorAll("svg g.mark-rect.role-mark > path[d]").length,
    }));
"""
IMAGES_JS = """
return Array.from(document.images).map(img => ({src: img.getAttribute("src"), width: img.naturalWidth,
                                                complete: img.complete}));
"""


def render(browser, page, chart_ids, screenshot):
    """Open `page`, wait until each chart of `chart_ids` has finished (rendered or failed), save a full-page
    screenshot; return the charts and images as CHARTS_JS and IMAGES_JS describe them."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page.as_uri())
    try:
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(
            lambda b: all(chart.get("status") for chart in b.execute_script(CHARTS_JS, chart_ids)))
    except TimeoutException:
        charts = browser.execute_script(CHARTS_JS, chart_ids)
        console = [entry["message"] for entry in browser.get_log("browser")]
        pytest.fail(f"{page}: charts not drawn after {RENDER_TIMEOUT_S} s: {charts}; console: {console}")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(height + 100, 10000))
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(screenshot))
    print(f"screenshot of {page.name}: {screenshot}")
    return browser.execute_script(CHARTS_JS, chart_ids), browser.execute_script(IMAGES_JS)


def check_page(browser, page, screenshot, shown):
    """Every vega plot of `shown` (the same command's --json) drew marks with no error, under its title, with a
    line per revision it has data of in the curves, and every image plot of every revision loaded."""
    _, declared_images = declared_plots()
    vega = {plot_id: renderers for plot_id, renderers in shown.items() if plot_id not in declared_images}
    charts, images = render(browser, page, [Renderer.remove_special_chars(plot_id) for plot_id in vega], screenshot)
    console = [entry["message"] for entry in browser.get_log("browser")]
    for chart, (plot_id, renderers) in zip(charts, vega.items()):
        assert chart["status"] == "rendered" and "Error" not in chart["text"], (chart, console)
        assert chart["svg"] and chart["marks"] > 0 and plot_id in chart["texts"], chart
        template = definition(plot_id)["template"]
        if template == "linear":  # a curve per revision and file
            assert chart["lines"] >= len(revisions(renderers)) * len(definition(plot_id).get("y", [plot_id])), chart
        if template == "confusion":  # at least a cell per actual class, per revision
            assert chart["rects"] >= len(revisions(renderers)) * len(CLASSES), chart
    assert len(images) == sum(len(r["revisions"]) for path in declared_images for r in shown[path]), images
    for image in images:
        assert image["complete"] and image["width"] > 0, f"{page}: image {image['src']} did not load"


def test_plots_show_page_draws_every_chart_offline(browser, repo, tmp_path):
    dvc(repo, "plots", "show", "-o", str(tmp_path / "show"))
    check_page(browser, tmp_path / "show" / "index.html", ARTIFACTS / "plots_show.png", shown_plots(repo, "show"))


def test_plots_diff_page_of_two_experiments_draws_every_chart_offline(browser, swept, tmp_path):
    revs = ["wd-5e-4", "blocks-1111"]
    dvc(swept.repo, "plots", "diff", *revs, "-o", str(tmp_path / "diff"))
    check_page(browser, tmp_path / "diff" / "index.html", ARTIFACTS / "plots_diff.png",
               shown_plots(swept.repo, "diff", *revs))


def test_plots_diff_page_of_runs_with_and_without_a_split_draws_every_chart_offline(browser, split_runs, tmp_path):
    dvc(split_runs, "plots", "diff", "HEAD~1", "HEAD", "-o", str(tmp_path / "diff"))
    check_page(browser, tmp_path / "diff" / "index.html", ARTIFACTS / "plots_diff_split.png",
               shown_plots(split_runs, "diff", "HEAD~1", "HEAD"))


def test_a_chart_that_fails_to_render_says_so_on_the_page(browser, tmp_path):
    """The template writes a chart's error into the page (and marks it), not only into the browser's console."""
    page = (REPO / "plots_template" / "index.html").read_text()
    broken = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"values": [{"x": 1}]},
              "mark": "no-such-mark", "encoding": {"x": {"field": "x", "type": "quantitative"}}}
    divs = ('<div id="broken"></div><div id="fine"></div><script>'
            f'vegaEmbed("#broken", {json.dumps(broken)});'
            f'vegaEmbed("#fine", {json.dumps({**broken, "mark": "point"})});</script>')
    (tmp_path / "index.html").write_text(page.replace("{refresh_tag}", "").replace("{plot_divs}", divs))
    charts, _ = render(browser, tmp_path / "index.html", ["broken", "fine"], ARTIFACTS / "plots_error.png")
    broken_chart, fine_chart = charts
    assert broken_chart["status"] == "error" and broken_chart["svg"] == 0, broken_chart
    assert broken_chart["text"].startswith("Error: ") and len(broken_chart["text"]) > 20, broken_chart  # its message
    assert fine_chart["status"] == "rendered" and fine_chart["marks"] == 1 and "Error" not in fine_chart["text"]
