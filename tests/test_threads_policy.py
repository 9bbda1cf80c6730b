"""The package asks libgomp for a short spin where it can (see ``nadmm_torch/__init__.py``):
only before torch is loaded, and never over a policy the user set."""

import os
import subprocess
import sys

import pytest

SHOW = "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
CODE = {
    "first": "import nadmm_torch, os; " + SHOW,
    "after_torch": "import torch, nadmm_torch, os; " + SHOW,
}


@pytest.mark.parametrize("case,user,expected", [
    ("first", {}, "1000 None"),
    ("first", {"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE"),
    ("first", {"GOMP_SPINCOUNT": "5"}, "5 None"),
    ("after_torch", {}, "None None"),
])
def test_wait_policy(case, user, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user)
    out = subprocess.run([sys.executable, "-c", CODE[case]], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected
