"""The notebooks: committed without outputs, and each runs top to bottom (small configuration).

The execution tests start a ``python3`` kernel (ipykernel, installed with the dev extras into
the same environment) with ``ATTENTION_DRIFT_SMALL=1``: a few records, cheap editor settings
and 64-sequence covariance statistics (cached under ``~/.cache/attention_drift``; a fresh
machine computes them in the first notebook that edits).

The executed copies in ``notebooks/html/`` (``make notebooks-html``) must show the committed
notebooks' code and work offline: plotly.js inlined once per page, before its first figure, and no
plotly.js from a CDN; in headless Chromium with every non-file request aborted, each page draws
every plotly figure and starts its attention views (the ``browser`` fixture of conftest.py, as the
explorer's browser tests).
"""

import html
import os
import re
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
HTML = sorted((NOTEBOOKS / "html").glob("*.html"))

PLOTLY_BUNDLE = re.compile(r"^\* plotly\.js v\d+\.\d+\.\d+", re.M)  # the banner that opens plotly.min.js
PLOTLY_CDN = re.compile(r"""(?:<script[^>]*\ssrc=|\bimport\s*\(?)\s*["'](?:https?:)?//cdn\.plot\.ly/""")


def test_notebooks_exist():
    names = {p.name for p in PATHS}
    for expected in ("00_tour.ipynb", "01_case_study.ipynb", "02_prevalence.ipynb", "03_which_module.ipynb",
                     "04_drift_vs_failure.ipynb", "05_patching.ipynb", "06_sadr.ipynb", "07_editors.ipynb"):
        assert expected in names


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_outputs_stripped(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them "
                       "(Clear All Outputs, or jupyter nbconvert --clear-output --inplace)")


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_executes(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("ATTENTION_DRIFT_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the kernel must be this interpreter (the venv), whatever kernels are installed elsewhere
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: cells raised {errors}"


def test_every_notebook_has_its_html_copy():
    assert [p.stem for p in HTML] == [p.stem for p in PATHS]


@pytest.mark.parametrize("path", HTML, ids=[p.stem for p in HTML])
def test_html_shows_the_current_notebook(path):
    """Each page was executed from the committed notebook: every code cell's source is on it
    (after a notebook edit, ``make notebooks-html NOTEBOOKS=notebooks/<name>.ipynb``)."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOKS / f"{path.stem}.ipynb", as_version=4)
    shown = html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))
    stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip() not in shown]
    assert not stale, f"{path.name} is stale: code cells {stale} of {path.stem}.ipynb are not on it"


@pytest.mark.parametrize("path", HTML, ids=[p.stem for p in HTML])
def test_html_inlines_plotly_once(path):
    text = path.read_text(encoding="utf-8")
    assert not PLOTLY_CDN.search(text), f"{path.name} loads plotly.js from its CDN (blank plots offline)"
    bundles = [m.start() for m in PLOTLY_BUNDLE.finditer(text)]
    figures = [m.start() for m in re.finditer(r'class="plotly-graph-div"', text)]
    assert figures, f"{path.name} has no plotly figure"
    assert len(bundles) == 1, f"{path.name}: plotly.js inlined {len(bundles)} times, not once"
    assert bundles[0] < figures[0], f"{path.name}: plotly.js comes after the first figure"
    assert len(text) < 8_000_000, f"{path.name}: {len(text) / 1e6:.1f} MB"


def test_the_html_checks_catch_a_cdn_page():
    """The checks above can fail: a page as notebook_connected writes it is caught."""
    page = '<script type="module">import "https://cdn.plot.ly/plotly-4.1.1.min"</script>'
    assert PLOTLY_CDN.search(page)
    assert PLOTLY_CDN.search('<script charset="utf-8" src="https://cdn.plot.ly/plotly-4.1.1.min.js"></script>')
    assert not PLOTLY_CDN.search('topojsonURL:"https://cdn.plot.ly/un/"')  # a URL inside the bundle is no load
    assert len(PLOTLY_BUNDLE.findall("/**\n* plotly.js v4.1.1\n* Copyright")) == 1


@pytest.mark.parametrize("path", HTML, ids=[p.stem for p in HTML])
def test_html_draws_its_plots_offline(browser, path):
    """Opened with every non-file request aborted, the page draws each plotly figure (an svg in
    a .plot-container), its attention views start without error, and no script raises; the
    remote scripts nbconvert's template names (require.js, MathJax, the widget manager) fail to
    load and are not needed."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors, requests = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
               else (requests.append(route.request.url), route.abort()))
    page.goto(path.resolve().as_uri(), wait_until="load", timeout=60_000)
    # every plotly figure drawn; the package's own views (viz.before_after_view, the explorer's
    # fragment) started or failed
    settled = """() => [...document.querySelectorAll('.plotly-graph-div')].every(
                            d => d.querySelector('.plot-container svg.main-svg'))
                        && [...document.querySelectorAll('.ad-explorer')].every(
                            v => v.hasAttribute('data-ready') || v.hasAttribute('data-error'))"""
    try:
        page.wait_for_function(settled, timeout=30_000)
    except Exception:  # playwright's TimeoutError: the assertions below say what is missing
        pass
    drawn = page.locator(".plotly-graph-div").evaluate_all(
        "divs => divs.map(d => !!d.querySelector('.plot-container svg.main-svg'))")
    views = page.locator(".ad-explorer").evaluate_all(
        "vs => vs.map(v => v.hasAttribute('data-error') ? 'error' : v.hasAttribute('data-ready') ? 'ready' : 'none')")
    page.close()
    assert drawn and all(drawn), f"{path.name}: figures drawn {drawn}"
    assert all(v == "ready" for v in views), f"{path.name}: attention views {views}"
    assert not [u for u in requests if "plot.ly" in u], requests
    assert [e for e in errors if not e.startswith("Failed to load resource")] == []
