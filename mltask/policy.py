"""What a provider agrees to run, whatever a subtask asks: its own policy, baked into its image.

A subtask comes from a stranger. Its ``allowed_modules`` are the requestor's choice, so a
provider that trusted them would import anything a subtask names (``allowed_modules:
[""]`` makes ``os.system`` an "estimator"). The provider image carries its own list of
import prefixes, written by ``mltask image build`` (``sklearn.`` plus each
``--allow-modules``) to :data:`POLICY_FILE`; a subtask's list may only narrow it. Files are
the other half: a provider opens only the files the subtask lists among its hash-checked
resources (the dataset and script are looked up by name, never as paths; see
:func:`mltask.data.resource_path`).

The image or VM stays the real boundary on Golem (a requestor can run any command there);
this is what the provider entry point itself enforces. The local backend and the verifier
run subtasks on the requestor's own machine, where the task's ``allowed_modules`` is the
user's own choice, so they pass no policy.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mltask.definition import PipelineSpec
from mltask.errors import TaskError
from mltask.estimators import EstimatorObject, class_paths
from mltask.protocol import Problem

# In the image: /opt/mltask/policy.json, next to the venv mltask-provider runs from.
POLICY_FILE = Path(sys.prefix) / "policy.json"
DEFAULT_MODULES = ("sklearn.",)
_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.$")


def module_prefixes(prefixes: Iterable[str], field: str) -> tuple[str, ...]:
    """Import prefixes a provider may be built to allow: whole packages, e.g. ``xgboost.``."""
    checked = tuple(dict.fromkeys(prefixes))
    for prefix in checked:
        if not _PREFIX.match(prefix):
            raise TaskError(field, f"{prefix[:100]!r} is not a package prefix; give one ending in '.', e.g. xgboost.")
    return checked


@dataclass(frozen=True)
class ProviderPolicy:
    """The import prefixes this provider allows estimators from."""

    modules: tuple[str, ...] = DEFAULT_MODULES

    def check(self, problem: Problem) -> None:
        """Refuse a problem naming an estimator outside the policy, before anything is imported."""
        spec = problem.estimator
        if isinstance(spec, EstimatorObject):  # every class it nests, each checked before anything is imported
            steps = [("", path) for path in class_paths(spec)]
        else:
            steps = spec.pipeline if isinstance(spec, PipelineSpec) else [("", spec)] if spec else []
        for step, path in steps:
            if not path.startswith(self.modules):
                field = f"options.estimator.pipeline.{step}" if step else "options.estimator"
                raise TaskError(field, f"{path[:200]!r} is outside the modules this provider allows "
                                f"({', '.join(self.modules)}); build its image with `mltask image build "
                                "--allow-modules PREFIX` to allow more")

    def to_json(self) -> str:
        return json.dumps({"allowed_modules": list(self.modules)})


def load_policy(path: Path = POLICY_FILE) -> ProviderPolicy:
    """The policy baked into this provider's image; the default where none was (outside an image)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ProviderPolicy()
    try:
        modules = json.loads(text)["allowed_modules"]
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise TypeError("allowed_modules is not a list of strings")
    except (ValueError, KeyError, TypeError) as exc:
        raise TaskError(str(path), f"the provider policy is unreadable ({exc}); rebuild the image") from None
    return ProviderPolicy(module_prefixes(modules, str(path)))


def check_named_files(problem: Problem) -> None:
    """The dataset and script a problem names must be among its resources, whose hashes are checked."""
    listed = {ref.name for ref in problem.resources}
    named = [("options.dataset.csv" if problem.dataset.csv else "options.dataset.npz", problem.dataset.file),
             ("options.script.file", problem.script.file if problem.script else None)]
    for field, name in named:
        if name is not None and name not in listed:
            raise TaskError(field, f"{name[:100]!r} is not among the subtask's resources; list it in `resources`")
