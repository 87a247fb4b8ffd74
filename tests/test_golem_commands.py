"""The golem backend's exact command sequence, executed against the real provider image.

No Golem provider can be run here, so a small adapter plays the exe-unit with Docker:
Deploy/Start create and start a container from the image (no network), SendFile copies
a file in, Run executes a command (a non-zero exit fails, as a Golem batch does),
DownloadFile copies a file out. The commands are the very values the golem backend sends.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from mltask.backends.commands import Deploy, DownloadFile, Run, SendFile, Start, setup_commands, subtask_commands
from mltask.definition import parse_definition
from mltask.image import docker_client
from mltask.protocol import TrialResult, TrialSpec, dumps, read_result
from mltask.referee import rerun
from mltask.scheduler import make_verifier
from mltask.task import HyperparameterSearchTask
from tests.support import task_dict

SCRIPT = '''
def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    return float(params["k"]) / 10
'''


class DockerExeUnit:
    """An exe-unit stand-in: runs mltask's Golem commands in a container of the image."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.container: Any = None
        self.log: list[str] = []

    def execute(self, commands: list) -> None:
        for command in commands:
            self.log.append(type(command).__name__)
            if isinstance(command, Deploy):
                self.container = docker_client().containers.create(
                    self.image, ["sleep", "infinity"], network_mode="none", labels={"org.mltask.test": "golem"})
            elif isinstance(command, Start):
                self.container.start()
            elif isinstance(command, SendFile):
                data = command.src.read_bytes()
                archive = io.BytesIO()
                with tarfile.open(fileobj=archive, mode="w") as tar:
                    info = tarfile.TarInfo(Path(command.dst).name)
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
                assert self.container.put_archive(str(Path(command.dst).parent), archive.getvalue())
            elif isinstance(command, Run):
                code, output = self.container.exec_run(list(command.args))
                assert code == 0, f"{command.args} exited {code}: {output.decode()[-500:]}"
            elif isinstance(command, DownloadFile):
                stream, _ = self.container.get_archive(command.src)
                with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                    member = tar.getmembers()[0]
                    assert member.isfile()
                    command.dst.write_bytes(tar.extractfile(member).read())
            else:
                raise AssertionError(f"unknown command {command!r}")

    def close(self) -> None:
        if self.container is not None:
            self.container.remove(force=True)


@pytest.mark.docker
def test_golem_command_sequence_runs_subtasks_in_the_real_image(provider_image: str, tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(SCRIPT)
    data = task_dict(estimator=None, scoring=None, script={"file": "train.py"}, algorithm="grid", n_trials=None,
                     search_space={"k": list(range(4))})
    data.update(resources=["train.py"], subtasks_count=2)
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    verifier = make_verifier(task)
    unit = DockerExeUnit(provider_image)
    try:
        unit.execute(setup_commands(sorted(task.resources_dir.iterdir())))
        for n in range(2):  # resources are sent once; each subtask reuses them
            subtask = task.next_subtask("golem-test")
            sent, answer = tmp_path / f"subtask{n}.json", tmp_path / f"answer{n}"
            sent.write_text(dumps(subtask))
            answer.mkdir()
            unit.execute(subtask_commands(sent, answer / "result.json"))
            result = read_result(answer, subtask)
            assert verifier.inspect(subtask.subtask_id, result, "golem-test").ok
            for trial in result.trials:  # bit for bit what the requestor's referee computes
                honest = TrialResult.model_validate_json(rerun(dumps(task.problem), str(task.resources_dir),
                                                               dumps(TrialSpec(number=trial.number, params=trial.params,
                                                                                seed=trial.seed)))[0])
                assert (honest.fold_scores, honest.fold_fingerprints) == (trial.fold_scores, trial.fold_fingerprints)
            assert [t.mean_score for t in result.trials] == pytest.approx([t.params["k"] / 10 for t in subtask.trials])
    finally:
        unit.close()
    assert unit.log[:3] == ["Deploy", "Start", "SendFile"] and unit.log.count("Deploy") == 1


@pytest.mark.docker
@pytest.mark.slow
def test_gvmi_of_the_provider_image_and_its_hash(provider_image: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    from tests.support import run_cli

    gvmi = tmp_path / "provider.gvmi"
    code, out, err = run_cli(["image", "gvmi", "--tag", provider_image, "--output", str(gvmi)], capsys)
    assert code == 0, err
    digest = hashlib.sha3_224(gvmi.read_bytes()).hexdigest()
    assert f"image hash (options.golem.image_hash): {digest}" in out
    assert gvmi.stat().st_size > 50e6
