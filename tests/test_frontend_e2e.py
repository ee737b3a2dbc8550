"""End to end in a real browser: gRPC server (in-process, tiny model) + ``cir ui`` (a
``streamlit run`` child on 127.0.0.1) + Debian's Chromium driven by Playwright.

The page loads, a gallery pick + text + Search shows result images, "Use as reference" on a
result refines (the reference changes and a second search runs), and a screenshot is saved to
``artifacts/ui-e2e.png``. Skipped only when /usr/bin/chromium is absent (``make setup-browser``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cir.demo import wait_http
from tests.helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Gallery,
    build_shapes_gallery,
    free_port,
    start_server,
)

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is missing: run `make setup-browser` (apt-get install chromium)",
    ),
]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    return build_shapes_gallery(tmp_path_factory.mktemp("e2e-gallery"))


@pytest.fixture(scope="module")
def server(gallery: Gallery) -> Iterator[Any]:
    srv = start_server(gallery)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ui(server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``cir ui`` (through ``python -m frontend.cli``) on a free port; yields the page URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("ui-log") / "ui.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CIR_UI_API_KEY", None)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "frontend.cli",
                "--server",
                server.target,
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--timeout",
                "30",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/_stcore/health", 60, proc)
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.send_signal(signal.SIGTERM)  # cir ui forwards it to streamlit
            try:
                code = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                pytest.fail("cir ui did not stop on SIGTERM:\n" + log_path.read_text()[-3000:])
        assert code == 0, log_path.read_text()[-3000:]


def _launch(pw: Any) -> Any:
    from playwright.sync_api import expect

    # a busy machine renders slowly: assertions wait as long as actions do
    expect.set_options(timeout=60_000)
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def _in_view(locator: Any, height: int = 900) -> bool:
    """The element lies entirely inside a viewport of ``height`` pixels (no scrolling)."""
    box = locator.bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= height


def test_search_and_refine_in_chromium(ui: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ui-e2e.png"
    first_screen = ARTIFACTS / "ui-e2e-1400x900.png"
    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(ui)
            expect(page.get_by_text("Composed image retrieval").first).to_be_visible()
            expect(page.get_by_text("Connected").first).to_be_visible()

            # reference: the first image of the gallery sample, named by its own id
            first_pick = page.locator("[class*='st-key-pick_'] button").first
            expect(first_pick).to_be_visible()
            card = first_pick.locator("xpath=ancestor::*[contains(@class,'st-key-pick_')][1]")
            assert re.search(r"st-key-pick_\S+", card.get_attribute("class") or "")
            first_pick.click()
            picked_box = page.locator(".st-key-gal_picked")
            expect(picked_box).to_be_visible()  # the picked image is highlighted
            found = re.search(r"img-\d{3}", picked_box.inner_text())
            assert found, picked_box.inner_text()
            picked_id = found.group(0)
            expect(picked_box.get_by_role("button", name="Picked")).to_be_disabled()
            expect(
                page.get_by_text(f"Current reference: gallery image {picked_id}")
            ).to_be_visible()

            # text + Search -> result grid with thumbnails, ranks, scores and user ids
            box = page.get_by_role("textbox", name="Modification text")
            box.fill("make it blue")  # no Enter: the click must carry the typed text
            page.get_by_role("button", name="Search", exact=True).click()
            card1 = page.locator(".st-key-card_1")
            expect(page.locator(".st-key-card_2")).to_be_visible()
            expect(page.locator(".st-key-card_1 img")).to_be_visible()
            expect(page.get_by_text(re.compile(r"#1 · score -?\d+\.\d{4}"))).to_be_visible()
            expect(page.locator("[class*='st-key-card_'] img")).to_have_count(12)
            expect(page.locator(".st-key-revisit_0")).to_be_visible()  # history step 1
            # the query box and the first results are on the first screen of 1400x900
            page.mouse.move(0, 0)
            page.wait_for_timeout(500)
            assert _in_view(box), box.bounding_box()
            assert _in_view(card1), card1.bounding_box()
            page.screenshot(path=str(first_screen))
            # Why? on a card: the result's and the reference's overlays, the caption's words
            page.locator(".st-key-why_1 button").first.click()
            expect(card1.locator("img")).to_have_count(3)
            expect(card1.locator("span[title]").filter(has_text="blue")).to_be_visible()
            page.locator(".st-key-why_1 button").first.click()  # Hide why
            expect(card1.locator("img")).to_have_count(1)
            # the first result that is not the current reference (it often ranks itself high)
            rank, target_id = next(
                (r, found.group(0))
                for r in range(1, 13)
                if (
                    found := re.search(r"img-\d{3}", page.locator(f".st-key-card_{r}").inner_text())
                )
                and found.group(0) != picked_id
            )
            # cards name images by their own ids, never by the uuid point ids
            assert not re.search(
                r"[0-9a-f]{8}-[0-9a-f]{4}-", page.locator(f".st-key-card_{rank}").inner_text()
            )

            # Use as reference: that result becomes the reference, and nothing runs until the
            # next change is typed and searched
            # (.first: with a help tooltip Streamlit nests the button in a second button-role node)
            page.locator(f".st-key-refine_{rank} button").first.click()
            expect(
                page.get_by_text(f"Current reference: gallery image {target_id}")
            ).to_be_visible()
            expect(page.get_by_text("Type the next change and press Search")).to_be_visible()
            expect(page.locator(".st-key-revisit_1")).to_have_count(0)
            box.fill("now a smaller one")
            page.get_by_role("button", name="Search", exact=True).click()
            expect(page.locator(".st-key-revisit_1")).to_be_visible()  # history step 2
            expect(page.get_by_text(re.compile(rf"Results for {target_id} \+"))).to_be_visible()
            expect(page.locator(".st-key-card_12 img")).to_be_visible()
            # Streamlit scrolls inside its own container, so full_page cannot grow the shot:
            # a tall viewport shows reference, query, history and the whole grid at once.
            page.mouse.move(0, 0)  # no tooltip over the cards
            page.set_viewport_size({"width": 1400, "height": 2300})
            page.evaluate(
                "for (const el of document.querySelectorAll('[data-testid=stMain], "
                "[data-testid=stAppViewContainer], section.main')) el.scrollTo(0, 0);"
                "window.scrollTo(0, 0);"
            )
            page.wait_for_timeout(800)  # let the last thumbnails paint
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000 and first_screen.stat().st_size > 10_000


def test_upload_limits_and_messages_in_chromium(ui: str, tmp_path: Path) -> None:
    """A refused upload says why, in words, and Search then says there is no usable reference;
    the uploader's own chip states the server's limit; Clear reference empties the uploader; a
    text over the server's limit is flagged at the box; a keyword filter offers known values."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    notes = tmp_path / "notes.png"
    notes.write_text("this is a shopping list, not a picture")
    good = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (220, 30, 30)).save(good)
    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(ui)
            expect(page.get_by_text("Connected").first).to_be_visible()
            page.get_by_role("tab", name="Upload").click()
            # one limit: the label and Streamlit's chip say the server's 10 MB
            expect(page.get_by_text(re.compile(r"at most 10 MB and 36 megapixels"))).to_be_visible()
            chip = page.locator("[data-testid=stFileUploaderDropzoneInstructions]")
            expect(chip).to_contain_text(re.compile(r"10(\.0)?\s?MB per file"))

            page.locator("input[type=file]").set_input_files(str(notes))
            expect(page.get_by_text("`notes.png` was refused".replace("`", ""))).to_be_visible()
            expect(page.get_by_text(re.compile(r"The file is text, not a JPEG"))).to_be_visible()
            expect(page.get_by_text(re.compile("BytesIO"))).to_have_count(0)
            page.get_by_role("textbox", name="Modification text").fill("make it blue")
            page.get_by_role("button", name="Search", exact=True).click()
            expect(page.get_by_text(re.compile("There is no usable reference"))).to_be_visible()
            expect(page.locator("[class*='st-key-card_']")).to_have_count(0)

            page.locator("input[type=file]").set_input_files(str(good))
            expect(page.get_by_text("Current reference: uploaded red.png")).to_be_visible()
            page.get_by_role("button", name="Clear reference").click()
            expect(page.get_by_text("No reference yet")).to_be_visible()
            # the uploader is empty again: no file name left in it
            expect(page.locator("[data-testid=stFileUploaderFileName]")).to_have_count(0)

            long = "make it " + "much " * 300 + "redder"
            page.get_by_role("textbox", name="Modification text").fill(long)
            page.get_by_role("textbox", name="Modification text").press("Tab")
            expect(
                page.get_by_text(re.compile(r"characters; the server reads at most 1,000"))
            ).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "ui-e2e-upload.png"))

            # a keyword filter offers the gallery's values; the caption says the filter in words
            page.locator(".st-key-flt_color").click()
            page.get_by_role("option", name="blue", exact=True).click()
            page.keyboard.press("Escape")
            page.get_by_role("textbox", name="Modification text").fill("make it bigger")
            page.get_by_role("button", name="Search", exact=True).click()
            caption = page.get_by_text(re.compile(r"shown · mode auto · filter: color is blue"))
            expect(caption).to_be_visible()
            assert "{" not in caption.inner_text()
            expect(page.locator(".st-key-card_1")).to_be_visible()
        finally:
            browser.close()
