"""The package asks libgomp for passive waiting where it can (see ``nadmm_torch/__init__.py``):
only before torch is loaded, and never over a policy the user set."""

import os
import subprocess
import sys

import pytest

CODE = {
    "first": "import nadmm_torch, os; print(os.environ.get('OMP_WAIT_POLICY'))",
    "after_torch": "import torch, nadmm_torch, os; print(os.environ.get('OMP_WAIT_POLICY'))",
}


@pytest.mark.parametrize("case,user,expected", [
    ("first", None, "PASSIVE"),
    ("first", "ACTIVE", "ACTIVE"),
    ("after_torch", None, "None"),
])
def test_wait_policy(case, user, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user is not None:
        env["OMP_WAIT_POLICY"] = user
    out = subprocess.run([sys.executable, "-c", CODE[case]], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected
