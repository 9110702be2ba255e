"""Sandboxes of each isolating backend, for the abuse suite and the code envs' tests.

A backend that cannot run on this machine skips its tests with the reason in the summary
(``pytest -ra``): bubblewrap needs the ``bubblewrap`` package (``make setup-system``).
"""

from __future__ import annotations

import shutil

import pytest

from palaestra.sandboxes import Sandbox, make_sandbox

BUBBLEWRAP_MISSING = (
    "BUBBLEWRAP NOT INSTALLED: the bubblewrap sandbox tests did not run. Install it with "
    "'make setup-system' (as root) or 'apt-get install bubblewrap'."
)


def bubblewrap_or_skip() -> Sandbox:
    if shutil.which("bwrap") is None:
        pytest.skip(BUBBLEWRAP_MISSING)
    return make_sandbox("bubblewrap")


@pytest.fixture(params=["bubblewrap"])
def isolated(request: pytest.FixtureRequest) -> Sandbox:
    """A sandbox of each isolating backend."""
    return bubblewrap_or_skip()
