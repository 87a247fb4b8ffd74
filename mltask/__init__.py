"""mltask: machine-learning hyperparameter search as a Golem task type."""

import importlib

__version__ = "0.1.0"

__all__ = ["TaskError", "__version__", "abort_task", "resume_task", "run_task"]

_LAZY = {"run_task": "mltask.runner", "resume_task": "mltask.runner", "abort_task": "mltask.runner",
         "TaskError": "mltask.errors"}


def __getattr__(name: str):  # lazy: `python -m mltask.provider` should not import the requestor side
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mltask' has no attribute {name!r}")
