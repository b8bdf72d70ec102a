"""Golden snapshots of the tile IR and the generated Numba source (PACEKERN_ACCEPT=1 rewrites them)."""
import re
from pathlib import Path

import pytest

import pacekern as pk
from pacekern import env
from pacekern_ops.gemm_f32 import gemm_f32
from pacekern_ops.gemv import gemv_s8

GOLDEN = Path(__file__).parent / "golden"
CASES = [(gemm_f32, pk.Config.of(MR=4, NV=2, KC=128, MT=12)), (gemm_f32, pk.Config.of(MR=5, NV=4, KC=256, MT=8)),
         (gemv_s8, pk.Config.of(R=2, NB=16, PF=256))]


def _normalize(text):
    # the kernel's line number moves whenever its file is edited above it; the snapshot is about the code
    text = re.sub(r"(\.py):\d+\)", r"\1:<line>)", text)
    return re.sub(r"intrinsics [0-9a-f]+", "intrinsics <hash>", text)


@pytest.mark.parametrize("kernel,cfg", CASES, ids=lambda x: getattr(x, "name", str(x)))
def test_golden(kernel, cfg):
    name = f"{kernel.name}_" + "_".join(f"{k}{v}" for k, v in cfg.values)
    for kind, text in [("ir", kernel.show_ir(cfg, level="avx512_vnni_bf16")),
                       ("py", kernel.source(cfg, level="avx512_vnni_bf16", interpret=False))]:
        path = GOLDEN / f"{name}.{kind}.txt"
        text = _normalize(text)
        if env.flag("PACEKERN_ACCEPT"):
            path.write_text(text)
        assert path.exists(), f"no snapshot {path}: create it with PACEKERN_ACCEPT=1"
        assert text == path.read_text(), f"{path} changed; review the diff and rerun with PACEKERN_ACCEPT=1"
