"""Helpers for the console's browser tests: Playwright driving Debian's
Chromium (Playwright's own browser download is not used; tools/setup
--test installs the `chromium` package), screenshots, logging in."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serverproc import REPO, MlinkProcess

# Where the tests save a screenshot of each page they visit.
SCREENSHOTS = Path(os.environ.get("MLINK_TEST_OUTPUT", REPO / "tests" / "output")) / "console"
# Debian's Chromium, or another one named by MLINK_CHROMIUM.
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    named = os.environ.get("MLINK_CHROMIUM")
    if named:
        return named
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    # Missing pieces fail, not skip: tools/setup --test installs both, and a
    # skipped console test would hide that nothing drove the pages.
    from playwright import sync_api

    path = chromium_path()
    assert path is not None, "no Chromium (tools/setup --test installs Debian's chromium)"
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def console_url(server: MlinkProcess) -> str:
    port = server.wait_for_log(r"console listening on https://127\.0\.0\.1:(\d+)").group(1)
    return f"https://127.0.0.1:{port}"


def new_page(browser: object, base: str) -> object:
    """A page in a fresh context (its own cookies). The test CA is not in
    Chromium's store; the certificate itself is checked by other tests."""
    context = browser.new_context(base_url=base, ignore_https_errors=True,  # type: ignore[attr-defined]
                                  viewport={"width": 1100, "height": 800})
    return context.new_page()


def log_in(page: object, jid: str, password: str) -> None:
    page.goto("/login")  # type: ignore[attr-defined]
    page.get_by_label("XMPP address").fill(jid)  # type: ignore[attr-defined]
    page.get_by_label("Password").fill(password)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Log in").click()  # type: ignore[attr-defined]
    page.wait_for_url(re.compile(r"/(users|me)$"))  # type: ignore[attr-defined]


def screenshot(page: object, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    return path


def csrf_of(page: object) -> str:
    return str(page.locator("input[name=csrf]").first.get_attribute("value"))  # type: ignore[attr-defined]
