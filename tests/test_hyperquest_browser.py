"""A player's whole game in a real browser: headless Debian Chromium driven by Playwright, against a real server.

login -> survey -> trial -> 2 epochs -> change the learning rate -> grow wider and deeper -> revert -> stop ->
leaderboard, checking what the page shows at each step (plot points, layer table, score, baselines).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from detseg.bench.hyperquest_load import free_port

from .hyperquest_support import skip_unless_present, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = skip_unless_present(Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM}")


@pytest.fixture
def server(tmp_path):
    """``detseg hyperquest`` in its own process (worker processes and all), tiny data sets, one data set."""
    port = free_port()
    env = {**os.environ, "DETSEG_HYPERQUEST_TINY": "1", "DETSEG_HYPERQUEST_ADMIN_TOKEN": "browser-test"}
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "detseg.cli", "hyperquest", "--port", str(port),
                                "--data-dir", str(tmp_path / "data"), "--epoch-limit", "6", "--dataset-pool", "1"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up():
        if process.poll() is not None:
            raise AssertionError(f"server exited: {(tmp_path / 'server.log').read_text()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=60, interval=0.2)
    yield url
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def plot_points(page, plot_id: str) -> list[int]:
    """Number of points of each trace of a Plotly plot (the page draws train and validation traces)."""
    return page.evaluate(f"document.getElementById('{plot_id}').data.map(trace => trace.x.length)")


def layer_widths(page) -> list[str]:
    return re.findall(r"dense, (\d+) units", page.inner_text("#layers"))   # hidden layers only


def train_epoch(page, expected_points: int) -> None:
    page.click("#train")
    page.wait_for_function(f"document.getElementById('loss-plot').data[0].x.length === {expected_points}"
                           " && !document.getElementById('train').disabled", timeout=30_000)


def test_a_player_walks_through_the_game(server):
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.set_default_timeout(30_000)
        page.goto(server)
        assert page.title() == "HyperQuest"

        page.fill("#login-id", "s1234")
        page.fill("#login-name", "Sam Student")
        page.click("#login-submit")
        page.select_option("#survey-experience", "intermediate")
        page.check("input[name=frameworks][value=pytorch]")
        page.click("#survey-submit")
        assert "How to play" in page.inner_text("#home-view")
        page.click("#new-trial")

        page.wait_for_function("document.getElementById('trial-state').textContent === 'ready to train'")
        assert page.is_enabled("#train") and not page.is_enabled("#stop")
        stats = page.inner_text("#dataset-stats")
        for label in ("kind", "input shape", "classes", "training examples", "validation examples", "class balance"):
            assert label in stats
        page.fill("#hp-lr", "0.05")
        train_epoch(page, 1)
        train_epoch(page, 2)
        assert plot_points(page, "loss-plot") == [2, 2] and plot_points(page, "acc-plot") == [2, 2]

        page.fill("#hp-lr", "0.01")
        train_epoch(page, 3)
        assert plot_points(page, "acc-plot") == [3, 3]
        assert "epoch 3 of 6" in page.inner_text("#trial-state")

        page.select_option("#grow-how", "wider")
        page.select_option("#grow-layer", "0")
        page.fill("#grow-factor", "2")
        page.click("#grow")
        page.wait_for_function("document.getElementById('layers').innerText.includes('512 units')")
        assert layer_widths(page) == ["512", "256"]
        page.select_option("#grow-how", "deeper")
        page.select_option("#grow-layer", "1")
        page.click("#grow")
        page.wait_for_function("document.getElementById('layers').rows.length === 4")
        assert layer_widths(page) == ["512", "256", "256"]

        epoch2 = page.evaluate("[...document.querySelectorAll('#revert-to option')]"
                               ".find(o => o.textContent.startsWith('epoch 2 (')).value")
        page.select_option("#revert-to", epoch2)
        page.click("#revert")
        page.wait_for_function("document.getElementById('loss-plot').data[0].x.length === 2")
        assert plot_points(page, "loss-plot") == [2, 2] and plot_points(page, "acc-plot") == [2, 2]
        assert layer_widths(page) == ["256", "256"]                  # the network of epoch 2, before growing
        shown_val_acc = page.evaluate("document.getElementById('acc-plot').data[1].y[1]")

        page.click("#stop")
        page.wait_for_selector("#final:not([hidden])")
        score = page.inner_text("#final-acc")
        assert score == f"{100 * shown_val_acc:.1f}%"

        page.click("#to-leaderboard")

        def board_complete():
            page.reload()
            page.wait_for_selector("#per-dataset table")
            text = page.inner_text("#per-dataset")
            return "computing" not in text and text
        board = wait_until(board_complete, timeout=60, interval=1.0)
        assert "Sam Student" in page.inner_text("#overall")
        row = page.inner_text("#per-dataset tr[data-trial]")
        assert "Sam Student" in row and score in row
        baselines = page.query_selector_all("#per-dataset tr.baseline")
        assert [b.get_attribute("data-baseline") for b in baselines] == [
            "majority", "logistic_regression", "default_network", "random_search"]
        for baseline in baselines:
            assert re.search(r"\d+\.\d%", baseline.inner_text())
        assert "random search (best of 5 draws)" in board
        assert errors == []
        browser.close()
