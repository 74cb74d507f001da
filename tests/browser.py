"""A real headless Chromium for tests: Debian's `chromium` and `chromium-driver` driven by
selenium (`make install` installs them where it can); `unavailable_reason()` says why not."""

from __future__ import annotations

import importlib.util
import os
import shutil

PAGE_LOAD_TIMEOUT_S = 60.0  # a cold chromium on a loaded 2-core machine
WINDOW = (1400, 1300)  # wide enough for the panels side by side in a screenshot


def unavailable_reason() -> str | None:
    """Why a browser test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (the namespace testbed)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for tool, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(tool) is None:
            return f"no {tool} (apt-get install {package}, or `make install` as root)"
    return None


def start_browser():
    """A headless Chromium under chromedriver; the caller quits it. Raises selenium's
    WebDriverException when it cannot start."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")),
                              options=options)
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    return driver


def attributes(driver, selector: str, *names: str) -> list[dict[str, str | None]]:
    """Data attributes of every element matching the CSS selector, read in one script call (an
    element re-rendered between two calls would otherwise go stale)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e =>"
        " Object.fromEntries(arguments[1].map(n => [n, e.getAttribute(n)])));",
        selector, list(names))


def number(text: str | None) -> float | None:
    """A data attribute as a float, None when empty or not a number."""
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None
