"""The provider image: built from ``docker/Dockerfile`` with the requestor's own versions.

Verification compares a provider's scores with a re-run on the requestor bit for bit, so
the image must hold exactly the numpy, scipy and scikit-learn the requestor has. Rather
than pinning versions in a file that drifts, :func:`build_image` builds wheels of the
installed versions (``pip wheel pkg==version``, normally from pip's cache) and of this
mltask into the build context; the image installs them offline, with the build's
network off, so no registry is needed inside Docker. The provider's own policy (the
module prefixes it imports estimators from, :mod:`mltask.policy`) is written into the
image at the same time.
"""

from __future__ import annotations

import hashlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mltask import __version__
from mltask.errors import TaskError
from mltask.policy import DEFAULT_MODULES, ProviderPolicy, module_prefixes

DEFAULT_TAG = f"mltask-provider:{__version__}"
# What `python -m mltask.provider` imports; everything else (Optuna, rich, matplotlib)
# stays on the requestor. pandas rebuilds the DataFrames GolemSearchCV sends as tables
# (about 60 MB installed): without it every DataFrame task would fail on a provider.
PROVIDER_PACKAGES = ("numpy", "scipy", "scikit-learn", "joblib", "threadpoolctl", "pydantic", "pandas")
SOURCE_DIR = Path(__file__).resolve().parent.parent


def default_base() -> str:
    """The public slim Python image of the requestor's Python minor version."""
    major, minor, _ = platform.python_version_tuple()
    return f"python:{major}.{minor}-slim-bookworm"


def pinned_requirements(roots: tuple[str, ...] = PROVIDER_PACKAGES) -> list[str]:
    """``name==version`` for ``roots`` and all they need, as installed here."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise TaskError("image", f"{name} is not installed here; `pip install -e .` first") from None
        seen[key] = f"{dist.metadata['Name']}=={dist.version}"
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sorted(seen.values())


def extra_modules(extras: tuple[str, ...]) -> list[str]:
    """The import prefixes of the extra distributions (``xgboost-cpu`` installs ``xgboost.``)."""
    owners = metadata.packages_distributions()
    prefixes = []
    for name in extras:
        try:
            dist = metadata.distribution(name).metadata["Name"]
        except metadata.PackageNotFoundError:
            raise TaskError("--with", f"{name} is not installed here; pip install {name} first (providers get the "
                            "version installed here)") from None
        prefixes += [f"{module}." for module, dists in sorted(owners.items())
                     if dist in dists and module.isidentifier() and not module.startswith("_")]
    return prefixes


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    id: str
    size: int


def docker_client(timeout: float | None = 60) -> Any:
    """A docker SDK client (``timeout`` per API call), or a one-line error saying how to get a daemon."""
    try:
        import docker
    except ImportError:
        raise TaskError("--backend", 'the docker SDK is missing; `pip install -e ".[docker]"`') from None
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        raise TaskError(
            "docker", f"cannot reach the Docker daemon ({str(exc).splitlines()[0][:120]}); start it "
            "(`dockerd &` or `systemctl start docker`) or set DOCKER_HOST"
        ) from None
    return client


def build_image(base: str | None = None, tag: str = DEFAULT_TAG, log: Any = print,
                allow_modules: tuple[str, ...] = (), extras: tuple[str, ...] = ()) -> BuiltImage:
    """Build the provider image from ``docker/Dockerfile`` with offline wheels.

    ``extras`` are more distributions for providers (``lightgbm``, ``xgboost-cpu``), each
    pinned to the version installed here with what it needs, as numpy and scikit-learn are,
    and each one's modules allowed. Its providers import estimators from ``sklearn.``, the
    extras and the ``allow_modules`` prefixes only, whatever a subtask allows (the packages
    must be installed in the image too).
    """
    allowed = (*DEFAULT_MODULES, *extra_modules(extras), *allow_modules)
    policy = ProviderPolicy(module_prefixes(allowed, "--allow-modules"))
    dockerfile = SOURCE_DIR / "docker" / "Dockerfile"
    if not dockerfile.is_file():
        raise TaskError("image", f"{dockerfile} is missing; build from a checkout of the mltask sources")
    client = docker_client()
    with tempfile.TemporaryDirectory(prefix="mltask-image-") as tmp:
        context = Path(tmp)
        shutil.copy(dockerfile, context / "Dockerfile")
        (context / "policy.json").write_text(policy.to_json())
        log(f"providers will import estimators from {', '.join(policy.modules)} only")
        wheels = context / "wheels"
        log(f"building wheels of {', '.join((*PROVIDER_PACKAGES, *extras))} and mltask {__version__} at the "
            "versions installed here")
        _pip_wheel(wheels, [str(SOURCE_DIR)])
        _pip_wheel(wheels, pinned_requirements((*PROVIDER_PACKAGES, *extras)))
        log(f"building {tag} on {base or default_base()}")
        output: list[str] = []
        for chunk in client.api.build(path=str(context), tag=tag, buildargs={"BASE": base or default_base()},
                                      rm=True, forcerm=True, network_mode="none", decode=True):
            line = chunk.get("stream", "").strip()
            if line.startswith("Step "):
                log(line.split(" : ")[0])
            elif line:
                output.append(line)
            if "error" in chunk:
                log("\n".join(output[-15:]))
                raise TaskError("image", f"docker build failed: {chunk['error'].strip()[:200]}; its output is above")
    image = client.images.get(tag)
    return BuiltImage(tag, image.id, int(image.attrs["Size"]))


def _pip_wheel(wheels: Path, requirements: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), *requirements]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise TaskError("image", f"pip wheel failed: {last[:300]}")


@dataclass(frozen=True)
class Gvmi:
    path: Path
    hash: str  # sha3-224 of the file: the image hash providers are asked for
    size: int


def build_gvmi(tag: str, output: Path, push_to: str | None = None, log: Any = print) -> Gvmi:
    """Convert the provider image to Golem's GVMI with ``gvmkit-build``; optionally push it.

    gvmkit-build runs a helper image (``scx1332/squashfs``); where Docker Hub is out of
    reach, ``.ci/docker.sh`` shows how to make a local stand-in.
    """
    tool = shutil.which("gvmkit-build")
    if tool is None:
        raise TaskError("image", 'gvmkit-build is missing; `pip install -e ".[golem]"`')
    if not _has_image(tag):
        raise TaskError("--tag", f"Docker image {tag!r} is not here; build it first with `mltask image build --tag "
                        f"{tag}`")
    cmd = [tool, tag, "--output", str(output), "--force"]
    if push_to:
        cmd += ["--push-to", push_to, "--nologin"]
    log(" ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not output.is_file():
        last = ([line for line in (done.stderr + done.stdout).splitlines() if line.strip()] or ["no output"])[-1]
        raise TaskError("image", f"gvmkit-build failed: {last.strip()[:200]} (it needs the scx1332/squashfs image; "
                        "see .ci/docker.sh for a local stand-in)")
    digest = hashlib.sha3_224()
    with output.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return Gvmi(output, digest.hexdigest(), output.stat().st_size)


def _has_image(tag: str) -> bool:
    import docker

    try:
        docker_client().images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True

