"""PACEKERN_LOG_LEVEL: 'profile' prints per-kernel call counts and time at exit."""
import os
import subprocess
import sys

from conftest import INTERPRET

CODE = """
import torch
from pacekern_ops.gemv import gemv_bf16
x, w, y = torch.randn(1, 32), torch.randn(16, 32).bfloat16(), torch.empty(1, 16)
for _ in range(5):
    gemv_bf16(x, w, y)
"""


def _run(level):
    env = dict(os.environ, PACEKERN_LOG_LEVEL=level, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=300)


def test_profile_level_prints_kernel_table_at_exit():
    out = _run("profile")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [l for l in out.stderr.splitlines() if l.startswith("gemv_bf16")]
    assert len(lines) == 1 and lines[0].split()[1] == "5", out.stderr[-2000:]


def test_info_level_prints_no_profile_and_bad_level_warns():
    assert "profile (time spent" not in _run("info").stderr
    out = _run("loud")
    assert out.returncode == 0 and "PACEKERN_LOG_LEVEL='loud' is not one of" in out.stderr
