"""Task types this package provides, described for front ends (``mltask types``).

Golem front ends list task types with a name, the options they take and defaults; ours is
one entry whose options schema is generated from the pydantic models, so it cannot drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
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


_REFERENCE_SECTIONS = (
    ("Task (top level)", "TaskDefinition"),
    ("options", "SearchOptions"),
    ("options.dataset", "DatasetSpec"),
    ("options.cv", "CVSpec"),
    ("options.script", "ScriptSpec"),
    ("options.verification", "VerificationOptions"),
    ("options.fidelity", "FidelitySpec"),
    ("search space: int", "IntParam"),
    ("search space: float", "FloatParam"),
    ("search space: categorical", "CategoricalParam"),
    ("search space: fixed", "FixedParam"),
)


def reference_markdown() -> str:
    """The task JSON reference in the README, generated from the schema so it cannot drift."""
    schema = TaskDefinition.model_json_schema()
    defs = schema.pop("$defs")
    defs["TaskDefinition"] = schema
    out = []
    for title, name in _REFERENCE_SECTIONS:
        out += [f"**{title}**", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for field, spec in defs[name]["properties"].items():
            default = "required" if "default" not in spec else json.dumps(spec["default"])
            if isinstance(spec.get("default"), dict):
                default = "see below"
            text = spec.get("description", "").replace("|", "\\|")
            out.append(f"| `{field}` | {_type(spec)} | `{default}` | {text} |")
        out.append("")
    return "\n".join(out)


def _type(spec: dict[str, Any]) -> str:
    if "anyOf" in spec or "oneOf" in spec:  # oneOf: a discriminated union
        return " or ".join(dict.fromkeys(_type(s) for s in spec.get("anyOf", spec.get("oneOf"))))
    if "const" in spec:
        return json.dumps(spec["const"])
    if "enum" in spec:
        return " / ".join(json.dumps(v) for v in spec["enum"])
    if "$ref" in spec:
        return spec["$ref"].rsplit("/", 1)[-1]
    if spec.get("type") == "array":
        if not spec.get("items"):
            return "list"
        items = _type(spec["items"])
        return f"list of ({items})" if " or " in items else f"list of {items}"
    if spec.get("type") == "object":
        return "object"
    return spec.get("type", "any")


TASK_TYPES = {
    TASK_TYPE_ID: TaskTypeInfo(
        id=TASK_TYPE_ID,
        name=TASK_TYPE_NAME,
        description="Tune a scikit-learn estimator or a training script by cross-validated search; "
        "grid, random, QMC, TPE or CMA-ES, with verified results.",
    )
}


def write_readme_reference(readme: Path) -> None:
    """Replace the generated block between the README's reference markers."""
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
    head, rest = text.split(start, 1)
    readme.write_text(head + start + reference_markdown() + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")


if __name__ == "__main__":  # python -m mltask.registry --write-readme
    import sys

    if sys.argv[1:] == ["--write-readme"]:
        write_readme_reference(Path(__file__).resolve().parent.parent / "README.md")
