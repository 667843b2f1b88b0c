"""The code's habits, checked in the fast tier: ``ruff check`` (lint) and ``ruff format --check`` (layout), with the
settings in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.runs import REPO

RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    assert RUFF, "ruff is not installed: `bash launch/setup.sh test` installs it"
    proc = subprocess.run([RUFF, *command, "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff {' '.join(command)}:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
