"""The one error type a user should ever see.

Every mistake a requestor can make (bad task JSON, a missing file, an unknown scorer...)
is raised as :class:`TaskError` naming the field at fault and what to do about it. The CLI
prints it as one line and exits with :data:`EXIT_USAGE`; nothing else escapes as a
traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    import pydantic

EXIT_USAGE = 2


class TaskError(Exception):
    """A user-facing error: ``field: what is wrong; what to do``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class AllTrialsFailed(TaskError):
    """Every trial of a search failed, as scikit-learn's "All N fits failed".

    Raised after the results were written (every trial's error is in them): a search that
    produced nothing must not look like one that worked. ``errors`` holds each distinct
    error with the number of trials that failed with it, most common first.
    """

    def __init__(self, n_failed: int, errors: list[tuple[str, int]], output_dir: Path) -> None:
        self.errors = errors
        self.output_dir = output_dir
        shown = "; ".join(f"{count}× {one_line(text)}" for text, count in errors[:_ERRORS_SHOWN])
        more = f"; and {len(errors) - _ERRORS_SHOWN} other errors" if len(errors) > _ERRORS_SHOWN else ""
        super().__init__(
            "", f"all {n_failed} trials failed: {shown}{more}; fix the task and create it again "
            f"(each trial's error is in {output_dir / 'results.csv'})"
        )


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C while a stopped task was being saved; its state file is intact."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        super().__init__(str(output_dir))


_ERRORS_SHOWN = 3


def one_line(text: str, limit: int = 300) -> str:
    """An error text on one line, at most ``limit`` characters: tracebacks and hints span many."""
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def pydantic_error_to_task_error(exc: pydantic.ValidationError, prefix: str = "") -> TaskError:
    """Turn pydantic's multi-line report into one line about the first problem.

    pydantic lists every error with its location; a requestor fixes one thing at a time,
    so we report the first, with a hint for the common kinds.
    """
    err = exc.errors(include_url=False)[0]
    parts = [part for part in err["loc"] if not _is_union_tag(part)] + list(err.get("ctx", {}).get("at", ()))
    field = json_path([*([prefix] if prefix else []), *parts])
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling (`mltask tasks schema` lists the fields)"
    elif kind == "missing":
        msg = "required field is missing; add it (`mltask tasks template` shows a valid task)"
    elif kind.startswith("value_error") or kind == "located":
        msg = msg.removeprefix("Value error, ")
    else:
        got = err.get("input")
        if got is not None and not isinstance(got, (dict, list)):
            msg = f"{msg} (got {got!r})"
    return TaskError(field, msg)


def located(message: str, *at: str | int) -> PydanticCustomError:
    """A validation error ``at`` a place below the field being validated.

    A validator that checks a whole list or mapping (repeated names, conditions between
    parameters) knows which item is at fault; raise this from it and the one-line error
    names that item (``options.estimator.pipeline[2]``), not only the container.
    """
    return PydanticCustomError("located", message, {"at": at})


def json_path(parts: list[str | int]) -> str:
    """``options.estimator.pipeline[2]``: keys joined by dots, list indexes in brackets."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _is_union_tag(part: object) -> bool:
    # pydantic puts the chosen union member ("int", "float", "function-after[...]") in
    # the location; users think of the JSON path only.
    wrappers = {"int", "float", "categorical", "fixed", "str", "list[...]", "PipelineSpec", "EstimatorObject"}
    return isinstance(part, str) and (part in wrappers or "[" in part)
