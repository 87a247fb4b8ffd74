"""The docker backend on the real provider image: a search, a hang, a kill, malicious results.

Marked ``docker``: they need the daemon and ``mltask-provider:<version>`` (``.ci/docker.sh``
builds both). Without them they are skipped with a banner, except in CI, where they fail.
"""

from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mltask import run_task
from mltask.backends.docker import LABEL, DockerBackend, OutputRefused, read_answer
from mltask.definition import parse_definition
from mltask.image import docker_client
from mltask.scheduler import make_verifier
from mltask.task import HyperparameterSearchTask
from tests.support import results, run_cli, task_dict, write_task

SCRIPT = '''
import os, resource, socket, time

def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    k, mode = params["k"], params["mode"]
    if mode == "hang" and k == 3:
        time.sleep(600)
    if mode == "slow":
        time.sleep(1.0)
    if mode == "escape":  # each way out that works adds a bit to the score; 0 means sandboxed
        score = 0
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=2).close()
            score += 1
        except OSError:
            pass
        for i, path in enumerate(["/golem/resources/planted", "/etc/planted", "/golem/work/planted"]):
            try:
                open(path, "w").close()
                score += 2 << i
            except OSError:
                pass
        score += 16 if os.getuid() == 0 else 0
        score += 32 if os.stat("/golem/output").st_mode & 0o077 else 0  # the provider's alone
        score += 64 if resource.getrlimit(resource.RLIMIT_NOFILE)[1] > 1024 else 0
        shm = os.statvfs("/dev/shm")
        score += 128 if shm.f_blocks * shm.f_frsize > 64 << 20 else 0
        return float(score)
    if mode in ("symlink", "huge"):  # a dishonest provider: writes its own answer and says so
        if mode == "symlink":
            os.symlink("/etc/passwd", "/golem/output/result.json")
        else:
            with open("/golem/output/.result.json.tmp", "w") as fh:
                fh.write("[" + "1," * 10_000_000 + "1]")
            os.replace("/golem/output/.result.json.tmp", "/golem/output/result.json")
        with open("/golem/answered", "wb") as fh:
            fh.write(b"\\n")
        time.sleep(600)  # never writes the honest result
    if mode in ("flood", "litter"):  # fills its output, then answers honestly (if it still can)
        try:
            for i in range(200 if mode == "flood" else 20_000):
                with open(f"/golem/output/{mode}-{i}", "wb") as fh:
                    fh.write(bytes(1 << 20) if mode == "flood" else b"x")
        except OSError:
            pass
    return float(k)
'''

def _script_task(tmp_path: Path, mode: str, n: int = 6, subtasks: int = 3, **envelope: Any) -> dict:
    (tmp_path / "train.py").write_text(SCRIPT)
    data = task_dict(estimator=None, scoring=None, script={"file": "train.py"}, algorithm="grid", n_trials=None,
                     search_space={"k": list(range(n)), "mode": mode}, max_attempts=2)
    data.update(resources=["train.py"], subtasks_count=subtasks, **envelope)
    return data


def _leftover_containers() -> list[Any]:
    return docker_client().containers.list(all=True, filters={"label": LABEL})


@pytest.mark.docker
def test_search_in_containers_matches_the_local_backend(provider_image: str, tmp_path: Path) -> None:
    data = task_dict(n_trials=8)
    run_task(data, backend="docker", workers=2, image=provider_image, output=tmp_path / "docker", quiet=True)
    run_task(data, backend="local", workers=2, output=tmp_path / "local", quiet=True)
    docker_doc, local_doc = results(tmp_path / "docker"), results(tmp_path / "local")
    assert docker_doc["status"] == "finished" and docker_doc["counts"]["complete"] == 8

    def scores(doc: dict) -> dict:
        return {t["number"]: (t["params"], t["mean_test_score"]) for t in doc["trials"]}

    assert scores(docker_doc) == scores(local_doc)
    verification = docker_doc["verification"]
    assert verification["rejected_subtasks"] == 0 and verification["banned_providers"] == {}
    assert all(t["provider"].startswith("docker-") for t in docker_doc["trials"])
    assert not _leftover_containers()


@pytest.mark.docker
def test_multi_fidelity_in_containers_matches_the_local_backend(provider_image: str, tmp_path: Path) -> None:
    """Rung evaluations (training folds subsampled inside the container) score as on the requestor."""
    data = task_dict(estimator="sklearn.ensemble.HistGradientBoostingClassifier", dataset={"builtin": "breast_cancer"},
                     search_space={"learning_rate": {"type": "float", "low": 0.01, "high": 0.5, "log": True}},
                     n_trials=6, fidelity={"resource": "n_samples", "min_resource": 40, "reduction_factor": 3})
    # One provider each: ASHA's decisions depend on the order results arrive in.
    run_task(data, backend="docker", workers=1, image=provider_image, output=tmp_path / "docker", quiet=True)
    run_task(data, backend="local", workers=1, output=tmp_path / "local", quiet=True)
    docker_doc, local_doc = results(tmp_path / "docker"), results(tmp_path / "local")
    assert docker_doc["status"] == "finished" and docker_doc["counts"]["pruned"] >= 1

    def rungs(doc: dict) -> dict:
        return {t["number"]: [(r["resource"], r["mean_score"], r["status"]) for r in t["rungs"]] for t in doc["trials"]}

    assert rungs(docker_doc) == rungs(local_doc)
    assert docker_doc["best"]["resource"] == 379 and docker_doc["best"]["verified"] == "full"
    assert docker_doc["verification"]["banned_providers"] == {}
    assert not _leftover_containers()


@pytest.mark.docker
def test_container_is_sandboxed(provider_image: str, tmp_path: Path) -> None:
    data = _script_task(tmp_path, "escape", n=2, subtasks=1)
    # The requestor's re-run could escape (root, a network), so its scores would differ: no checks here.
    data["options"]["verification"] = {"budget": 0, "verify_best": False}
    run_task(write_task(tmp_path, data), backend="docker", workers=1, image=provider_image,
             output=tmp_path / "out", quiet=True)
    assert [t["mean_test_score"] for t in results(tmp_path / "out")["trials"]] == [0.0, 0.0]


@pytest.mark.docker
def test_hanging_subtask_is_killed_and_its_trial_fails_alone(provider_image: str, tmp_path: Path) -> None:
    data = _script_task(tmp_path, "hang", n=6, subtasks=3, subtask_timeout="00:00:06")
    run_task(write_task(tmp_path, data), backend="docker", workers=2, image=provider_image,
             output=tmp_path / "out", quiet=True)
    trials = {t["params"]["k"]: t for t in results(tmp_path / "out")["trials"]}
    assert trials[3]["state"] == "failed" and "timed out" in trials[3]["error"]
    assert all(trials[k]["mean_test_score"] == k for k in (0, 1, 2, 4, 5))
    assert not _leftover_containers()


@pytest.mark.docker
def test_killed_container_is_replaced_and_its_subtask_sent_again(provider_image: str, tmp_path: Path) -> None:
    data = _script_task(tmp_path, "slow", n=6, subtasks=6)
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    backend = DockerBackend(workers=2, image=provider_image)

    def killer() -> None:
        deadline = time.monotonic() + 60
        while backend._slots[0].subtask is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        backend._slots[0].container.kill()

    from mltask.scheduler import drive

    with backend:
        backend.start(task.resources_dir, tmp_path / "scratch")
        threading.Thread(target=killer).start()
        assert drive(task, backend, timeout=300) == "finished"
    reasons = [s["reason"] or "" for s in task.store.subtasks() if s["state"] == "rejected"]
    assert any("container died" in r for r in reasons), reasons
    assert task.progress().done == 6 and task.progress().failed == 0


@pytest.mark.docker
@pytest.mark.parametrize(("mode", "why"), [("symlink", "links are refused"), ("huge", "larger than"),
                                           ("flood", "'flood-0' besides one answer"),
                                           ("litter", "'litter-0' besides one answer")])
def test_malicious_result_is_refused_and_its_provider_banned(
    provider_image: str, tmp_path: Path, mode: str, why: str
) -> None:
    task = HyperparameterSearchTask.create(parse_definition(_script_task(tmp_path, mode, n=2, subtasks=1)),
                                           tmp_path, tmp_path / "out")
    with DockerBackend(workers=1, image=provider_image) as backend:
        backend.start(task.resources_dir, tmp_path / "scratch")
        first = backend._slots[0].container.id
        backend.submit("docker-0", task.next_subtask("docker-0"), 120)
        done: list = []
        while not done:
            done = backend.wait(1.0)
        make_verifier(task).settle(done[0], 0.0)
        assert backend._slots[0].container.id != first  # stopped, and its output with it
        assert first not in {c.id for c in _leftover_containers()}
        # Bounded in the container: nothing it wrote reached this machine's disk.
        assert sum(p.stat().st_size for p in (tmp_path / "scratch").rglob("*") if p.is_file()) < 1 << 20
    assert "docker-0" in task.store.bans()
    [subtask] = task.store.subtasks()
    assert subtask["state"] == "rejected" and why in subtask["reason"], subtask["reason"]
    assert task.progress().done == 0


@pytest.mark.docker
def test_leftover_containers_of_a_killed_requestor_are_removed(provider_image: str, tmp_path: Path) -> None:
    task = HyperparameterSearchTask.create(parse_definition(task_dict()), tmp_path, tmp_path / "out")
    crashed = DockerBackend(workers=2, image=provider_image)
    crashed.start(task.resources_dir, tmp_path / "scratch")  # never closed, as after kill -9
    assert len(_leftover_containers()) == 2
    with DockerBackend(workers=1, image=provider_image) as backend:
        backend.start(task.resources_dir, tmp_path / "scratch")
        assert len(_leftover_containers()) == 1
    assert not _leftover_containers()


@pytest.mark.docker
def test_missing_image_names_the_build_command(provider_image: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    task = write_task(tmp_path, task_dict())
    code, _, err = run_cli(["tasks", "create", str(task), "--backend", "docker", "--image", "mltask-provider:nope",
                            "--output", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and "mltask image build --tag mltask-provider:nope" in err and err.count("\n") == 1


def test_unreachable_daemon_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    task = write_task(tmp_path, task_dict())
    code, _, err = run_cli(["tasks", "create", str(task), "--backend", "docker", "--output", str(tmp_path / "out"),
                            "--quiet"], capsys)
    assert code == 2 and "cannot reach the Docker daemon" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # checked before anything is created


@pytest.mark.docker
def test_image_carries_its_provider_policy(provider_image: str) -> None:
    probe = "from mltask.policy import POLICY_FILE, load_policy; print(POLICY_FILE, load_policy().modules)"
    container = docker_client().containers.create(provider_image, ["python", "-c", probe], network_mode="none")
    try:
        container.start()
        container.wait(timeout=60)
        out = container.logs(stderr=False)
    finally:
        container.remove(force=True, v=True)  # v: the image's anonymous volumes too
    # .ci/docker.sh builds the image `--with lightgbm`, whose modules its policy then allows too
    assert out.decode().strip() in ("/opt/mltask/policy.json ('sklearn.',)",
                                    "/opt/mltask/policy.json ('sklearn.', 'lightgbm.')")


def test_image_build_refuses_a_prefix_that_allows_everything(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["image", "build", "--allow-modules", "", "--tag", "mltask-provider:never"], capsys)
    assert code == 2 and "--allow-modules: '' is not a package prefix" in err and err.count("\n") == 1


def _tar(*members: tuple[str, bytes | str | None]) -> list[bytes]:
    """A tar of an output dir as the Docker API streams it: (name, content, or a link target as str)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        root = tarfile.TarInfo(".")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        for name, content in members:
            info = tarfile.TarInfo(f"./{name}")
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content or b"")
                tar.addfile(info, io.BytesIO(content or b""))
    data = buffer.getvalue()
    return [data[i:i + 700] for i in range(0, len(data), 700)]  # chunks that cut headers in two


def test_read_answer_takes_one_answer_within_its_bound() -> None:
    assert read_answer(_tar(("result.json", b'{"a": 1}')), 100) == ("result.json", b'{"a": 1}')
    assert read_answer(_tar(("error.txt", b"TaskError: x")), 100) == ("error.txt", b"TaskError: x")
    refusals = {
        "besides one answer": _tar(("result.json", b"{}"), ("junk", b"x")),
        "'result.json' besides": _tar(("result.json", b"{}"), ("result.json", b"{}")),
        "'error.txt' besides": _tar(("result.json", b"{}"), ("error.txt", b"x")),
        "links are refused": _tar(("result.json", "/etc/passwd")),
        "larger than the 100-byte bound": _tar(("result.json", b" " * 101)),
        "holds no answer": _tar(),
    }
    for why, chunks in refusals.items():
        with pytest.raises(OutputRefused, match=why):
            read_answer(chunks, 100)


CHEATING_PROVIDER = '''#!/opt/mltask/bin/python
"""mltask-provider, but every score it reports is 0.05 better than it computed."""
import sys

import mltask.provider as provider

honest = provider.evaluate_subtask


def inflated(*args, **kwargs):
    result = honest(*args, **kwargs)
    trials = []
    for trial in result.trials:
        if trial.status == "ok":
            folds = [min(1.0, s + 0.05) for s in trial.fold_scores]
            mean = sum(folds) / len(folds)
            std = (sum((f - mean) ** 2 for f in folds) / len(folds)) ** 0.5
            trial = trial.model_copy(update={"fold_scores": folds, "mean_score": mean, "std_score": std})
        trials.append(trial)
    return result.model_copy(update={"trials": trials})


provider.evaluate_subtask = inflated
sys.exit(provider.main())
'''


@pytest.fixture(scope="module")
def dishonest_image(provider_image: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The provider image with its evaluation replaced by a cheat, as a dishonest provider would run."""
    context = tmp_path_factory.mktemp("dishonest")
    (context / "mltask-provider").write_text(CHEATING_PROVIDER)
    (context / "Dockerfile").write_text(
        f"FROM {provider_image}\nUSER root\nCOPY mltask-provider /opt/mltask/bin/mltask-provider\n"
        "RUN chmod 755 /opt/mltask/bin/mltask-provider\nUSER 10001\n"
    )
    tag = f"{provider_image}-dishonest"
    client = docker_client()
    client.images.build(path=str(context), tag=tag, rm=True)
    yield tag
    client.images.remove(tag, force=True)


class _OneDishonestContainer(DockerBackend):
    """Containers of the provider image, except one of a dishonest image (test-side, not product code)."""

    def __init__(self, dishonest: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dishonest = dishonest

    def _start_container(self, slot: Any) -> None:
        honest = self.image
        self.image = self.dishonest.get(slot.name, honest)
        try:
            super()._start_container(slot)
        finally:
            self.image = honest


@pytest.mark.docker
def test_dishonest_container_is_banned_by_checks_delegated_to_the_others(
    provider_image: str, dishonest_image: str, tmp_path: Path
) -> None:
    from tests.dishonest import run_inline

    # A generous budget, so that sampled checks surely go out to other containers (at the
    # default 5% a run may check everything on the requestor, as one CI run did).
    data = task_dict(n_trials=40, cv={"kind": "stratified", "folds": 5}, verification={"budget": 0.5})
    data["subtasks_count"] = 8
    honest, _, _ = run_inline(data, tmp_path / "honest", {"a": None, "b": None})
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    from mltask.scheduler import drive

    with _OneDishonestContainer({"docker-3": dishonest_image}, workers=4, image=provider_image) as backend:
        backend.start(task.resources_dir, tmp_path / "scratch")
        assert drive(task, backend, timeout=600) == "finished"
    assert set(task.store.bans()) == {"docker-3"}
    provider_of = {s["subtask_id"]: s["provider"] for s in task.store.subtasks("search")}
    delegated = [v for v in task.store.verdicts() if v["by"].startswith("docker-")]
    assert delegated and all(v["by"] != provider_of[v["subtask_id"]] for v in delegated)
    best = task.best_trial()
    assert best.verified == "full" and best.provider != "docker-3"
    assert best.value == honest.best_trial().value  # the true best is reported
    assert all(r.provider != "docker-3" for r in task.store.trials())
    assert not _leftover_containers()
