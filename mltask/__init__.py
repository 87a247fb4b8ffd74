"""mltask: machine-learning hyperparameter search as a Golem task type."""

from mltask.errors import AllTrialsFailed

__version__ = "0.1.0"

__all__ = ["AllTrialsFailed", "GolemSearchCV", "__version__", "run_task"]


def __getattr__(name: str):  # lazy: `python -m mltask.provider` should not import the requestor side
    if name == "run_task":
        from mltask.runner import run_task

        return run_task
    if name == "GolemSearchCV":
        from mltask.search_cv import GolemSearchCV

        return GolemSearchCV
    raise AttributeError(name)
