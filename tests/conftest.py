"""Docker and yagna for the tests that need them: skipped loudly without, never in CI."""

from __future__ import annotations

import os
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


def skip_loudly(why: str) -> None:
    """Skip, and repeat why in a red banner at the end of the run."""
    _SKIPPED.append(why)
    pytest.skip(why)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SKIPPED:
        terminalreporter.write_sep("!", "TESTS SKIPPED FOR WANT OF DOCKER OR YAGNA (CI never skips them)", red=True,
                                   bold=True)
        for why in sorted(set(_SKIPPED)):
            terminalreporter.write_line(why)
