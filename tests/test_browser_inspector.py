"""A real browser drives the new panels (Debian chromium + Playwright, no network): a live run fills
the mid-token inspector (thumbnails of the mid blocks) and its heatmap; a prompt schedule typed into
the table switches the prompt and the switch shows in the panels; a shipped 2-minute example
replays into every panel. Screenshots go to ``$PACKFORCING_SCREENSHOT_DIR`` (default: a temporary
directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing (install Debian's `chromium` package)")

PROMPT = "a red circle and a blue square bouncing over a dark grey background"
LATER = "a yellow triangle bouncing over a white background"


@pytest.fixture()
def page(app_url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, wait_until="domcontentloaded")
            expect(page.get_by_label("Prompt")).to_be_visible(timeout=30_000)
            yield page
        finally:
            browser.close()


def _shot(page, name, tmp_path) -> Path:
    folder = Path(os.environ.get("PACKFORCING_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)  # plot transitions
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def _generate(page, timeout=120_000):
    from playwright.sync_api import expect

    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.get_by_text("Done in")).to_be_visible(timeout=timeout)
    expect(page.get_by_role("button", name="Generate", exact=True)).to_be_enabled(timeout=10_000)


def test_live_run_fills_the_inspector(page, tmp_path):
    """5 s of PackForcing (sink 2 blocks, recent 1): at the last block one mid block is archived and
    attended: its thumbnail is drawn, marked selected, and the heatmap shows its tokens' attention."""
    from playwright.sync_api import expect

    page.get_by_label("Prompt").fill(PROMPT)
    _generate(page)
    inspector, heatmap = page.locator("#pf-inspector"), page.locator("#pf-heatmap")
    expect(inspector.get_by_text("1 of 1 selected in most layers")).to_be_visible(timeout=20_000)
    assert inspector.locator("image").count() >= 1  # the thumbnail of mid block 2's frames
    expect(inspector.get_by_text("block 2 · ✔ #1")).to_be_visible()
    expect(heatmap.get_by_text("Mid block 2 at generation block 4")).to_be_visible()
    expect(heatmap.get_by_text("of the block's attention")).to_be_visible()
    expect(page.locator("#pf-story").get_by_text("Block 4:")).to_be_visible()
    expect(page.locator("#pf-story").get_by_text("Compression.")).to_be_visible()
    print(f"screenshot: {_shot(page, 'live_inspector', tmp_path)}")


def test_prompt_schedule_in_browser(page, tmp_path):
    """A second prompt at 3 s (block 4 of 5), re-cached: the run completes, the occupancy and latency
    panels mark the switch, and the walk-through of block 4 tells it."""
    from playwright.sync_api import expect

    page.get_by_label("Prompt").fill(PROMPT)
    page.get_by_text("Prompt schedule: change the prompt mid-video").click()
    table = page.locator("#pf-schedule")
    for cell, text in (("cell-0-0", "3"), ("cell-0-1", LATER)):
        table.get_by_test_id(cell).dblclick()
        # the cell's editor opens a moment after the double click: keys typed before it has the
        # focus go to the grid and are lost (the first letter of the prompt, once)
        expect(table.get_by_test_id(cell).get_by_label("Edit cell")).to_be_focused()
        page.keyboard.type(text)
        page.keyboard.press("Enter")
    page.get_by_label("re-cache under the new prompt").check()
    _generate(page)
    expect(page.locator("#pf-occupancy").get_by_text("prompt 1 (recache)")).to_be_visible(timeout=20_000)
    story = page.locator("#pf-story")
    expect(story.get_by_text("Prompt switch.")).to_be_visible()
    expect(story.get_by_text(LATER)).to_be_visible()
    expect(story.get_by_text("4 committed blocks re-run")).to_be_visible()
    print(f"screenshot: {_shot(page, 'prompt_schedule', tmp_path)}")


def test_replay_of_a_shipped_example_fills_every_panel(page, tmp_path):
    from playwright.sync_api import expect

    from packforcing.studio import replay

    example = next(e for e in replay.examples() if e["name"] == "packforcing")
    page.get_by_role("tab", name="Replay").click()
    page.get_by_role("button", name=example["label"]).click()
    expect(page.get_by_text("Replaying " + example["label"])).to_be_visible(timeout=60_000)
    for placeholder in ("No cache occupancy recorded yet.", "No finished blocks recorded yet.",
                        "No block generated (or replayed) yet."):
        expect(page.get_by_text(placeholder)).to_have_count(0)
    inspector = page.locator("#pf-inspector")
    expect(inspector.get_by_text("of 116 selected in most layers")).to_be_visible(timeout=20_000)
    assert inspector.locator("image").count() >= 16
    expect(page.locator("#pf-heatmap").get_by_text("at generation block 119")).to_be_visible()
    expect(page.locator("#pf-story").get_by_text("Block 119:")).to_be_visible()
    assert page.locator(".js-plotly-plot").count() >= 6
    expect(page.locator("video[src*='video.mp4']")).to_have_count(1, timeout=20_000)
    print(f"screenshot: {_shot(page, 'replay_example', tmp_path)}")
