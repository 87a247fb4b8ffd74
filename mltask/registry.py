"""Task types this package provides, described for front ends (``mltask types``).

Golem front ends list task types with a name, the options they take and defaults; ours is
one entry whose options schema is generated from the pydantic models, so it cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mltask.definition import TASK_TYPE_ID, TASK_TYPE_NAME, TaskDefinition, template


@dataclass(frozen=True)
class TaskTypeInfo:
    id: str
    name: str
    description: str

    def schema(self) -> dict[str, Any]:
        """JSON Schema of the whole task JSON."""
        return TaskDefinition.model_json_schema()

    def defaults(self) -> dict[str, Any]:
        """A minimal valid task to start from."""
        return template()


TASK_TYPES = {
    TASK_TYPE_ID: TaskTypeInfo(
        id=TASK_TYPE_ID,
        name=TASK_TYPE_NAME,
        description="Tune a scikit-learn estimator or a training script by cross-validated search; "
        "grid, random, QMC, TPE or CMA-ES, with verified results.",
    )
}
