"""The linter holds over the code: unused imports, undefined names and the like cannot land."""

import os
import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    result = subprocess.run([ruff, "check", "apps", "scripts", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


SERVER_MODULES = ("monailabel", "lib.server", "lib.datastore", "lib.dicomweb", "lib.infers", "lib.trainers")


def test_the_offline_scripts_import_no_server():
    """Training and evaluating offline need the model, the engine and MONAI's transforms, never MONAI Label's server
    or sam3d's tasks (lib/engine and lib/training hold what both use)."""
    for script in ("train", "evaluate"):
        code = f"import sys; import {script}; print(sorted(m for m in sys.modules if m.startswith({SERVER_MODULES!r})))"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "scripts"), os.path.join(ROOT, "apps", "sam3d")])}
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == "[]", (script, result.stdout[-2000:])
