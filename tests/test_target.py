"""ISA levels come from the feature set, and a forced lower level really compiles for it."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import pacekern as pk
from pacekern.target import _level_of, _numba_features
from pacekern.isa import LEVELS

SPR = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "avx512bf16", "amx-tile", "amx-int8", "amx-bf16"}


def test_levels_from_features():
    assert _level_of(SPR) == "amx"
    assert _level_of(SPR - {"amx-int8"}) == "avx512_vnni_bf16"          # Zen4/Zen5: no AMX
    assert _level_of(SPR - {"avx512bf16"}) == "avx512"                  # Skylake-X
    assert _level_of({"avx2", "fma"}) == "avx2"
    assert _level_of({"sse2"}) == "generic"


def test_forced_level_drops_higher_features():
    name, feats = _numba_features("avx2", SPR | {"avxvnni", "avx512fp16"})
    assert name == "haswell" and "+avx2" in feats
    assert all(f"-{f}" in feats for f in ("avx512f", "avx512vnni", "amx-tile", "avxvnni", "avx512fp16"))


def test_cpu_info_is_consistent():
    hw = pk.target()
    assert hw.level in LEVELS and LEVELS.index(hw.level) <= LEVELS.index(hw.host_level)
    assert hw.threads >= 1 and hw.l1d > 0 and hw.l3 >= hw.l2 > 0
    assert hw.level in hw.fingerprint() and "rocketlake" not in hw.fingerprint()


@pytest.mark.heavy
def test_forced_avx2_process_runs_kernels_without_zmm(tmp_path):
    """On an AVX512 host, PACEKERN_ISA=avx2 compiles for AVX2 only: correct results, no zmm, and the
    VNNI op lowered to its generic form (an AVX512 instruction there would abort the process)."""
    if LEVELS.index(pk.target().host_level) < LEVELS.index("avx2"):
        pytest.skip("host has no AVX2")
    code = textwrap.dedent("""
        import json, torch, pacekern as pk
        from pacekern_ops.gemm_f32 import gemm_f32, pack
        cfg = pk.Config.of(MR=4, NV=4, KC=128, MT=12)
        x, w, y = torch.randn(33, 70), torch.randn(70, 50), torch.empty(33, 50)
        ok = pk.check(gemm_f32, x, pack(w), y, config=cfg).ok
        r = gemm_f32.asm(cfg)
        print(json.dumps({"level": pk.target().level, "ok": ok, "zmm": r.zmm_registers, "ymm": r.ymm_registers}))
    """)
    env = dict(os.environ, PACEKERN_ISA="avx2", PACEKERN_CACHE_DIR=str(tmp_path), PYTHONPATH=os.getcwd())
    env.pop("PACEKERN_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"level": "avx2", "ok": True, "zmm": 0, "ymm": res["ymm"]} and res["ymm"] > 8
    assert "without AVX512" in out.stderr                      # the one warning


def test_thread_budget_reaches_numba_torch_and_the_tuning_key(tmp_path):
    """PACEKERN_NUM_THREADS=1 and pk.set_num_threads set Numba's and torch's thread counts and
    pk.target().threads (which the tuning key holds); a count beyond the CPUs is refused."""
    code = textwrap.dedent("""
        import json, numba, torch, pacekern as pk
        from pacekern_ops.gemv import gemv_bf16
        x, w, y = torch.randn(1, 32), torch.randn(24, 32).bfloat16(), torch.empty(1, 24)
        gemv_bf16(x, w, y)
        seen = [numba.get_num_threads(), torch.get_num_threads(), pk.target().threads]
        cores = pk.target().cores
        pk.set_num_threads(cores)
        seen += [numba.get_num_threads(), torch.get_num_threads(), pk.target().threads,
                 f"threads={cores}" in pk.target().fingerprint()]
        try:
            pk.set_num_threads(cores + 1)
            seen.append("accepted")
        except ValueError as e:
            seen.append("refused" if "choose 1 to" in str(e) else str(e))
        print(json.dumps([seen, cores]))
    """)
    env = dict(os.environ, PACEKERN_NUM_THREADS="1", PACEKERN_CACHE_DIR=str(tmp_path), PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    seen, cores = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == [1, 1, 1, cores, cores, cores, True, "refused"]


def test_describe_names_the_cpu_and_the_level_used(monkeypatch):
    hw = pk.target()
    line = hw.describe()
    assert f"ISA level {hw.level}" in line and f"{hw.threads} threads" in line and "forced" not in line
    import dataclasses
    lower = dataclasses.replace(hw, level="generic", host_level="avx2")
    assert "ISA level generic, forced below the host's avx2" in lower.describe()
