"""The built documentation renders in a real browser: headless Chromium opens the home page
and an API page, and each shows its title, the navigation and a code block.

Needs the built site (``make -C docs html``) and Chromium (Debian: ``apt-get install -y
chromium``). Outside CI the test skips, saying which is missing; ``.ci/run`` builds the
site, installs Chromium and sets ``LRC_REQUIRE_DOCS_BROWSER=1``, under which a missing
piece fails the test instead. The screenshots are kept in ``docs/_build/screenshots``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"
SCREENSHOTS = ROOT / "docs" / "_build" / "screenshots"
REQUIRED = os.environ.get("LRC_REQUIRE_DOCS_BROWSER") == "1"
WIDTH, HEIGHT = 1280, 1000


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (LRC_REQUIRE_DOCS_BROWSER=1: the docs test must run here)")
    pytest.skip(reason)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    _missing("no Chromium on PATH (apt-get install -y chromium)")
    raise AssertionError  # unreachable: _missing raises


def _page(relative: str) -> Path:
    page = SITE / relative
    if not page.is_file():
        _missing(f"{page} is not built (make -C docs html)")
    return page


def _run_chromium(*args: str) -> str:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--hide-scrollbars", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


class _Elements(HTMLParser):
    """The parts of a rendered DOM this test looks at."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.nav_links: list[str] = []
        self.code_blocks = 0
        self.ids: set[str] = set()
        self._in_title = False
        self._nav_depth = 0
        self._stack: list[str] = []
        self._link: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if attributes.get("id"):
            self.ids.add(attributes["id"] or "")
        if tag == "title":
            self._in_title = True
        if tag == "div" and "sidebar-tree" in classes:
            self._nav_depth = 1
        elif self._nav_depth and tag == "div":
            self._nav_depth += 1
        if self._nav_depth and tag == "a":
            self._link = []
        if tag == "div" and "highlight" in classes:
            self.code_blocks += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if self._nav_depth and tag == "div":
            self._nav_depth -= 1
        if tag == "a" and self._link is not None:
            self.nav_links.append(" ".join("".join(self._link).split()))
            self._link = None

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._link is not None:
            self._link.append(data)


def _rendered(relative: str) -> _Elements:
    dom = _run_chromium("--dump-dom", _page(relative).as_uri())
    elements = _Elements()
    elements.feed(dom)
    return elements


def _screenshot(relative: str, name: str) -> np.ndarray:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    path.unlink(missing_ok=True)
    _run_chromium(f"--window-size={WIDTH},{HEIGHT}", f"--screenshot={path}",
                  _page(relative).as_uri())  # fmt: skip
    assert path.is_file(), f"Chromium wrote no screenshot of {relative}"
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (HEIGHT, WIDTH, 3), f"{path}: {image.shape}"
    return image


def _check_styled(image: np.ndarray, name: str) -> None:
    # Furo's stylesheet paints the sidebar's full height in its secondary background
    # (#f8f9fb); an unstyled page is white there. And a rendered page has text: many
    # colours, some of them dark.
    corner = image[HEIGHT - 20 :, :40].reshape(-1, 3)
    assert (corner != 255).any(axis=1).all(), f"{name}: no styled sidebar (stylesheet not applied?)"
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 100, f"{name}: {len(colours)} colours, the page looks blank"
    assert (image.max(axis=2) < 80).mean() > 0.005, f"{name}: no dark text"


def test_home_page_renders_with_navigation_and_code() -> None:
    page = _rendered("index.html")
    assert page.title.startswith("lrc-lightning"), page.title
    for chapter in ("Getting started", "Guides", "Concepts", "Results", "API reference"):
        assert chapter in page.nav_links, f"{chapter!r} not in the navigation: {page.nav_links}"
    assert page.code_blocks >= 1, "the home page shows no code block"
    _check_styled(_screenshot("index.html", "index.png"), "index.html")


def test_api_page_renders_the_public_names() -> None:
    page = _rendered("api/lrc_lightning.html")
    assert "lrc_lightning" in page.title and "lrc-lightning" in page.title, page.title
    assert "API reference" in page.nav_links, page.nav_links
    for name in ("LRCCallback", "LRCMixin", "LocalizedRegionContrastLoss", "felzenszwalb"):
        assert f"lrc_lightning.{name}" in page.ids, f"lrc_lightning.{name} is not documented"
    assert page.code_blocks >= 1, "the API page shows no code block (docstring examples)"
    _check_styled(_screenshot("api/lrc_lightning.html", "api_lrc_lightning.png"),
                  "api/lrc_lightning.html")  # fmt: skip
