"""The example notebook, executed cell by cell by a real Jupyter kernel (nbclient + ipykernel): GolemSearchCV
starts its local workers from a kernel, whose main module is no file, and gets scikit-learn's results."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "golemsearchcv.ipynb"


@pytest.mark.slow
def test_the_example_notebook_runs_in_a_jupyter_kernel(tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(  # what the test compares, printed by the kernel
        "import json\nprint(json.dumps({'params': search.cv_results_['params'], "
        "'auc': list(search.cv_results_['mean_test_roc_auc']), 'out': str(search.output_dir_.resolve())}))"))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    printed = json.loads(notebook.cells[-1]["outputs"][0]["text"])
    assert Path(printed["out"]).is_relative_to(tmp_path.resolve() / "mltask-results")  # the kernel's own folder

    # scikit-learn on the very configurations the kernel's search ran
    from sklearn.model_selection import GridSearchCV

    exec(notebook.cells[1].source + "\n" + notebook.cells[3].source, scope := {})
    theirs = GridSearchCV(scope["model"], [{k: [v] for k, v in p.items()} for p in printed["params"]],
                          scoring=["accuracy", "roc_auc"], refit="roc_auc", cv=4).fit(scope["X"], scope["y"])
    np.testing.assert_array_equal(printed["auc"], theirs.cv_results_["mean_test_roc_auc"])
