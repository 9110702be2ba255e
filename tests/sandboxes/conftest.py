"""Sandboxes of each isolating backend, for the abuse suite and the code envs' tests.

A backend that cannot run on this machine skips its tests with the reason in the summary
(``pytest -ra``): bubblewrap needs the ``bubblewrap`` package, docker a Docker engine
(``make setup-system`` installs both). Where ``dockerd`` is installed but not running and the
tests run as root, the session starts it (and stops it at the end), and builds the sandbox
image once if it is missing (``palaestra sandbox build-image``, about a minute).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from palaestra.sandboxes import Sandbox, SandboxError, make_sandbox

BUBBLEWRAP_MISSING = (
    "BUBBLEWRAP NOT INSTALLED: the bubblewrap sandbox tests did not run. Install it with "
    "'make setup-system' (as root) or 'apt-get install bubblewrap'."
)
DOCKER_MISSING = "NO DOCKER ENGINE COULD START: the docker sandbox tests did not run ({})."
DOCKERD_START_S = 60.0
"""How long a freshly started dockerd may take to answer."""


def bubblewrap_or_skip() -> Sandbox:
    if shutil.which("bwrap") is None:
        pytest.skip(BUBBLEWRAP_MISSING)
    return make_sandbox("bubblewrap")


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A Docker engine with the sandbox image, started and built here if need be."""
    from palaestra.sandboxes.docker import IMAGE, build_image, docker_client

    started = None
    try:
        client = docker_client()
    except SandboxError as error:
        if os.geteuid() != 0 or shutil.which("dockerd") is None:
            pytest.skip(DOCKER_MISSING.format(error))
        log = Path(tempfile.mkdtemp(prefix="palaestra-dockerd-")) / "dockerd.log"
        with log.open("wb") as out:
            started = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT)
        client = _wait_for_engine(started, log)
    try:
        try:
            client.images.get(IMAGE)
        except Exception:
            if os.geteuid() != 0 or shutil.which("debootstrap") is None:
                pytest.skip(DOCKER_MISSING.format(f"no image {IMAGE} and no root to build it"))
            build_image(IMAGE)
        yield
    finally:
        if started is not None:
            started.terminate()
            started.wait(timeout=60)


def _wait_for_engine(dockerd: subprocess.Popen, log: Path):
    from palaestra.sandboxes.docker import docker_client

    deadline = time.monotonic() + DOCKERD_START_S
    while True:  # dockerd has no readiness signal but its API answering
        try:
            return docker_client()
        except SandboxError as error:
            if dockerd.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-500:]
                pytest.skip(DOCKER_MISSING.format(f"dockerd did not come up: {error} {tail}"))
        time.sleep(0.2)


@pytest.fixture(params=["bubblewrap", pytest.param("docker", marks=pytest.mark.docker)])
def isolated(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A sandbox of each isolating backend."""
    if request.param == "bubblewrap":
        yield bubblewrap_or_skip()
        return
    request.getfixturevalue("docker_engine")
    sandbox = make_sandbox("docker")
    yield sandbox
    sandbox.close()
