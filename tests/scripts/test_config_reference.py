"""README's configuration reference is what scripts/config_reference.py generates from the command line."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_configuration_reference_matches_the_cli():
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts/config_reference.py"), "--check"],
        capture_output=True,
        text=True,
        env=dict(os.environ, RINGLLM_API_KEY="", RINGLLM_MODEL=""),
    )
    assert check.returncode == 0, check.stdout + check.stderr
