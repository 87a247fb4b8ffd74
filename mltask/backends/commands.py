"""What a requestor does on a Golem activity, as small command values (as in golem-core).

The golem backend turns these into golem-core's ``Deploy``, ``Start``, ``SendFile``, ``Run``
and ``DownloadFile``; a test adapter executes the very same list against the provider
image in Docker (send = copy in, run = exec, download = copy out). So the paths and the
command line a Golem provider sees are tested against the real image, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mltask.protocol import RESULT_FILE, SUBTASK_FILE

RESOURCES = "/golem/resources"
WORK = "/golem/work"
OUTPUT = "/golem/output"
PROVIDER_COMMAND = ("mltask-provider", "--work", WORK, "--resources", RESOURCES, "--output", OUTPUT)


@dataclass(frozen=True)
class Deploy:
    """Deploy the image on the provider."""


@dataclass(frozen=True)
class Start:
    """Start the deployed image."""


@dataclass(frozen=True)
class SendFile:
    """Copy a requestor file to a path in the provider's image."""

    src: Path
    dst: str


@dataclass(frozen=True)
class Run:
    """Run a command in the provider's image; a non-zero exit fails the batch."""

    args: tuple[str, ...]


@dataclass(frozen=True)
class DownloadFile:
    """Copy a file from the provider's image to the requestor."""

    src: str
    dst: Path


Command = Deploy | Start | SendFile | Run | DownloadFile


def setup_commands(resources: list[Path]) -> list[Command]:
    """Once per provider: deploy, start, send every resource (reused by all its subtasks)."""
    sends: list[Command] = [SendFile(path, f"{RESOURCES}/{path.name}") for path in resources]
    return [Deploy(), Start(), *sends]


def subtask_commands(subtask_file: Path, result_file: Path) -> list[Command]:
    """Per subtask: send its definition, clear the last answer, run the provider, fetch the answer."""
    return [
        SendFile(subtask_file, f"{WORK}/{SUBTASK_FILE}"),
        Run(("/bin/sh", "-c", f"rm -f {OUTPUT}/{RESULT_FILE}")),
        Run(PROVIDER_COMMAND),
        DownloadFile(f"{OUTPUT}/{RESULT_FILE}", result_file),
    ]
