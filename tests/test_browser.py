"""A real browser drives the Studio: Debian chromium + Playwright's sync API (no network needed).

Loads the page, enters a prompt, generates a 5 s video with the embedded model and checks that
the final video element and the analysis plots rendered. The screenshot goes to
``$PACKFORCING_SCREENSHOT`` (default: a pytest temporary file).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing (install Debian's `chromium` package)")

PROMPT = "a red circle and a blue square bouncing over a dark grey background"


def test_generate_in_browser(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot = Path(os.environ.get("PACKFORCING_SCREENSHOT") or tmp_path / "studio.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, wait_until="domcontentloaded")  # never "networkidle": Gradio keeps a stream open
            prompt = page.get_by_label("Prompt")
            expect(prompt).to_be_visible(timeout=30_000)
            prompt.fill(PROMPT)
            page.get_by_role("button", name="Generate", exact=True).click()
            t0 = time.perf_counter()
            # the progress bar reports every block, then "Done in …"
            expect(page.get_by_text("Generating…")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Done in")).to_be_visible(timeout=120_000)
            final = page.locator("video[src*='video.mp4']")
            expect(final).to_have_count(1, timeout=30_000)
            plots = page.locator(".js-plotly-plot")
            expect(plots.nth(2)).to_be_visible(timeout=30_000)
            assert plots.count() >= 3
            # the analysis plots show data (a trace with points), not the "No … yet" placeholders
            expect(page.get_by_text("No cache occupancy recorded yet.")).to_have_count(0)
            expect(page.get_by_text("No finished blocks recorded yet.")).to_have_count(0)
            assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 3
            expect(page.get_by_text("block 5/5").first).to_be_visible()
            # the app is ready again: Generate re-enabled after the run
            expect(page.get_by_role("button", name="Generate", exact=True)).to_be_enabled(timeout=10_000)
            page.wait_for_timeout(500)  # let the plots finish their transitions
            page.screenshot(path=str(shot), full_page=True)
            print(f"generation in the browser took {time.perf_counter() - t0:.1f} s; screenshot: {shot}")
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
