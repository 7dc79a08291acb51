"""The course in a real browser: JupyterLab + headless Chromium (Debian's ``chromium``, driven by Playwright).

The test starts JupyterLab on a free localhost port with a token, in a temporary folder holding
a copy of the notebooks with their outputs cleared (JupyterLab autosaves: the committed notebooks
are never touched), opens ``05_magic_step_by_step.ipynb``, runs all cells from the Run menu,
waits for every cell to finish, clicks the StepThrough widget's **Next** button, and checks that
the page shows the candidate table and that the text grew by one token.

Screenshots go to ``test-output/browser/`` at the repository root (gitignored):
``05_after_run_all.png``, ``05_after_next.png``, and ``05_failure.png`` if it fails.

Without Chromium (or Playwright) the test is skipped with the reason; with
``MAGIC_EDU_REQUIRE_BROWSER=1`` (set by ``.ci/run``) that is a failure instead.
``MAGIC_EDU_CHROMIUM`` may name the browser binary (default: ``chromium`` on PATH, then
``/usr/bin/chromium``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "05_magic_step_by_step.ipynb"
OUTPUT = ROOT / "test-output" / "browser"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-quic",
]
SERVER_START_S = 90
RUN_ALL_S = 240  # kernel start and every cell of notebook 5 (about 20 s on 2 cores; generous for loaded CI)
TOKENS = re.compile(r"(\d+) of at most \d+ tokens|Ended after (\d+) tokens|No step yet")

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _missing(reason: str) -> None:
    """Skip, or fail where CI requires the browser."""
    if os.environ.get("MAGIC_EDU_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and MAGIC_EDU_REQUIRE_BROWSER=1 requires the browser test to run", pytrace=False)
    pytest.skip(f"{reason}; install it (apt-get install chromium) to run the real-browser test")


def _chromium() -> str:
    candidates = [os.environ.get("MAGIC_EDU_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  "/usr/bin/chromium"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    _missing("no Chromium found (looked for $MAGIC_EDU_CHROMIUM, chromium, chromium-browser, /usr/bin/chromium)")
    raise AssertionError("unreachable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_root(tmp: Path) -> Path:
    """A folder with the notebook (outputs cleared) and JupyterLab settings for a test run."""
    root = tmp / "notebooks"
    root.mkdir()
    nb = nbformat.read(str(ROOT / "notebooks" / NOTEBOOK), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, str(root / NOTEBOOK))
    # every cell in the DOM (JupyterLab 4 otherwise renders only what is on screen); no news pop-up
    settings = tmp / "settings"
    for plugin, values in {
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        path = settings / (plugin + ".jupyterlab-settings")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return root


@pytest.fixture
def jupyterlab(tmp_path):
    """(base URL, token) of a JupyterLab serving a cleared copy of notebook 5; stopped afterwards."""
    root = _prepare_root(tmp_path)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.open_browser=False",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
           "--LabApp.news_url=", "--ServerApp.terminals_enabled=False"]
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited early:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer in {SERVER_START_S} s:\n"
                            f"{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _token_count(text: str) -> int:
    m = TOKENS.search(text)
    assert m, f"the StepThrough widget shows no token count in {text[:300]!r}"
    return int(m.group(1) or m.group(2) or 0)


def test_widgets_labextension_is_installed():
    """ipywidgets 8 renders in JupyterLab 4 through the jupyterlab_widgets package's prebuilt extension."""
    import jupyterlab_widgets

    share = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "@jupyter-widgets" / "jupyterlab-manager"
    assert (share / "package.json").is_file(), f"no prebuilt widget extension at {share}"
    assert jupyterlab_widgets.__version__.startswith("3."), jupyterlab_widgets.__version__


@pytest.fixture
def chromium():
    """The browser binary (checked before JupyterLab is started, so a skip costs nothing)."""
    executable = _chromium()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright Python package is not installed")
    return executable


def test_step_through_in_jupyterlab(chromium, jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = chromium
    base, token = jupyterlab
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for old in OUTPUT.glob("05_*.png"):
        old.unlink()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", wait_until="domcontentloaded", timeout=90_000)
            n_code = sum(c.cell_type == "code" for c in nbformat.read(str(ROOT / "notebooks" / NOTEBOOK), 4).cells)
            page.wait_for_function(  # the notebook is open with all its cells
                "n => document.querySelectorAll('.jp-Notebook .jp-CodeCell').length === n", arg=n_code,
                timeout=90_000, polling=500)
            # wait for the kernel, then Run > Run All Cells
            page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\| Idle")).first.wait_for(timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            # every code cell has an execution count (none pending) once all have run
            page.wait_for_function(
                """() => {
                    const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
                    return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
                }""", timeout=RUN_ALL_S * 1000, polling=1000)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                  has_text="Traceback")
            assert errors.count() == 0, errors.first.inner_text()[:2000]

            widget = page.locator(".jp-OutputArea-output .widget-vbox", has=page.locator(
                "button.widget-button", has_text=re.compile(r"^\s*Next\s*$"))).first
            widget.wait_for(timeout=60_000)
            next_button = widget.locator("button.widget-button", has_text=re.compile(r"^\s*Next\s*$"))
            widget.scroll_into_view_if_needed()
            # the candidate table: its header and one row (with a force button) per candidate
            for column in ("rank", "token", "p(v|x)", "penalty", "CLIP", "score"):
                assert widget.get_by_text(column, exact=True).first.is_visible(), f"no {column!r} column"
            assert widget.locator("button.widget-button", has_text=re.compile(r"^\s*(force|taken)\s*$")).count() > 1
            page.screenshot(path=str(OUTPUT / "05_after_run_all.png"), full_page=False)

            if next_button.is_disabled():  # the caption had already ended: step back once first
                widget.locator("button.widget-button", has_text=re.compile(r"^\s*Back\s*$")).click()
                page.wait_for_timeout(500)
            before = _token_count(widget.inner_text())
            next_button.click()
            page.wait_for_function(
                """([el, before]) => {
                    const m = el.innerText.match(/(\\d+) of at most \\d+ tokens|Ended after (\\d+) tokens/);
                    return m && Number(m[1] || m[2]) === before + 1;
                }""", arg=[widget.element_handle(), before], timeout=60_000)
            after = _token_count(widget.inner_text())
            assert after == before + 1
            assert widget.get_by_text("◀ newest").count() >= 1  # the new token is marked in the text
            assert widget.get_by_text(f"Step {after - 1}").count() >= 1  # the table now shows the new step
            page.wait_for_timeout(1500)  # let the step's plot (a PNG sent after the table) arrive
            widget.screenshot(path=str(OUTPUT / "05_after_next.png"))
        except BaseException:
            page.screenshot(path=str(OUTPUT / "05_failure.png"), full_page=True)
            raise
        finally:
            context.close()


# -- an exported decode, opened from disk with the network blocked ---------------------------------
def test_exported_decode_steps_in_chromium_without_network(chromium, tmp_path):
    """``export_html``'s page, opened as a file:// URL with every other request aborted (and none
    attempted): the first step's text and candidate table, then Next and the ArrowRight key."""
    from playwright.sync_api import sync_playwright

    from magic_edu.decoding import Stepper
    from magic_edu.presets import data_dir, load_models
    from magic_edu.toyworld import shapes
    from magic_edu.views.export import export_html

    if not (data_dir() / "toy" / "defaults.json").is_file():
        pytest.skip(f"the toy models are not in {data_dir() / 'toy'}")
    toy = load_models("toy")
    scene = shapes.make_scene(shapes.HELD_OUT_SEED)
    stepper = Stepper(toy.lm, "magic", clip=toy.clip, image=scene.image)
    stepper.step()
    second = stepper.step()
    stepper.back()  # force step 1's second-best candidate, so a forced token is on the page
    stepper.step(force=second.token_ids[1] if second.chosen != 1 else second.token_ids[0])
    trace = stepper.run()[0].trace
    page_file = export_html(trace, tmp_path / "decode.html", image=scene.image)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "export_decode.png"
    shot.unlink(missing_ok=True)

    outside: list[str] = []

    def only_files(route) -> None:
        if route.request.url.startswith(("file://", "data:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1000, "height": 900})
        context.route("**/*", only_files)
        page = context.new_page()
        page.on("request", lambda r: None if r.url.startswith(("file://", "data:")) else outside.append(r.url))
        try:
            page.goto(page_file.resolve().as_uri(), wait_until="load")

            def shown() -> tuple[str, str, list[str]]:
                rows = page.locator("#candidates tbody tr")
                return (page.locator("#step-label").inner_text(), page.locator("#text").inner_text(),
                        [rows.nth(i).inner_text() for i in range(rows.count())])

            label, text, rows = shown()
            first = trace.steps[0]
            assert label == f"Step 0 (1 of {len(trace.steps)})"
            assert text.split() == ["⟨start_of_text⟩", first.chosen_token]
            assert len(rows) == first.k and rows[first.chosen].rstrip().endswith("◀ chosen")
            assert [r.split("\t")[1] for r in rows] == first.tokens
            headers = page.locator("#candidates thead th").all_inner_texts()
            assert headers[:6] == ["rank", "token", "p(v|x)", "degeneration penalty", "CLIP score", "score"]
            assert page.locator("#prev").is_disabled() and page.get_by_role("button", name="next step").is_enabled()
            assert page.locator("img#image").evaluate("img => img.complete && img.naturalWidth > 0")

            page.get_by_role("button", name="next step").click()
            label, text, rows = shown()
            forced = trace.steps[1]
            assert label == f"Step 1 (2 of {len(trace.steps)})"
            assert text.split() == ["⟨start_of_text⟩", first.chosen_token, forced.chosen_token]
            assert [r.split("\t")[1] for r in rows] == forced.tokens
            assert rows[forced.chosen].rstrip().endswith("◀ forced")
            assert page.locator("#text .tok.forced").count() == 1

            page.keyboard.press("ArrowRight")
            label, text, rows = shown()
            third = trace.steps[2]
            assert label == f"Step 2 (3 of {len(trace.steps)})"
            assert page.locator("#text .tok.newest").inner_text() == third.chosen_token
            assert [r.split("\t")[1] for r in rows] == third.tokens
            page.keyboard.press("End")
            assert page.locator("#step-label").inner_text().startswith(f"Step {len(trace.steps) - 1} ")
            page.keyboard.press("Home")
            page.keyboard.press("ArrowRight")
            page.keyboard.press("ArrowRight")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
            browser.close()
    assert outside == [], f"the page tried to reach {outside}"
    assert shot.is_file()
