"""Docker, yagna and chromium for the tests that need them: skipped loudly without, never in CI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_SKIPPED: list[str] = []


@pytest.fixture(scope="session")
def provider_image() -> str:
    """The provider image tag, once the daemon answers and the image exists."""
    from mltask.errors import TaskError
    from mltask.image import DEFAULT_TAG, docker_client

    tag = os.environ.get("MLTASK_TEST_IMAGE", DEFAULT_TAG)
    try:
        client = docker_client()
        client.images.get(tag)
    except (TaskError, Exception) as exc:  # no SDK, no daemon, or no image
        why = f"{exc}".splitlines()[0][:200]
        if os.environ.get("CI"):
            pytest.fail(f"Docker tests must run in CI, but: {why} (.ci/docker.sh sets Docker up)")
        skip_loudly(f"NO DOCKER: {why}; run `bash .ci/docker.sh` (as root) to set up the daemon and image")
    return tag


# Debian's chromium, started as the machine's notes say it must be offline: no sandbox (root),
# no GPU, no background networking (its connections are refused here, many at a time).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium driven by Playwright (Playwright's own browser download cannot work offline).

    Module-scoped: Playwright's sync API keeps an asyncio loop running while it is open,
    and later tests that call ``asyncio.run`` must not find one.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("NO PLAYWRIGHT: `pip install -e \".[dev]\"` installs it")
    if not Path(CHROMIUM).exists():
        _missing(f"NO CHROMIUM: {CHROMIUM} is missing; `bash .ci/browser.sh` (as root) installs Debian's chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _missing(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests must run in CI, but: {why}")
    skip_loudly(why)


def skip_loudly(why: str) -> None:
    """Skip, and repeat why in a red banner at the end of the run."""
    _SKIPPED.append(why)
    pytest.skip(why)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SKIPPED:
        terminalreporter.write_sep("!", "TESTS SKIPPED FOR WANT OF DOCKER, YAGNA OR CHROMIUM (CI never skips them)",
                                   red=True, bold=True)
        for why in sorted(set(_SKIPPED)):
            terminalreporter.write_line(why)
