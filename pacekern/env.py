"""Every environment variable pacekern reads, declared once with its default and meaning.

`get(name)` is the only way the project reads them; the README table is generated from this
list (`python -m pacekern.env`), so it cannot drift from the code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Var:
    name: str
    default: str
    help: str


VARS = {v.name: v for v in [
    Var("PACEKERN_ISA", "", "Force a lower ISA level: amx, avx512_vnni_bf16, avx512, avx2 or generic "
        "(default: the best this CPU has). Must be set before the first kernel compiles."),
    Var("PACEKERN_INTERPRET", "0", "1 runs kernels as plain Python over NumPy emulations of the vector ops "
        "(print/pdb work inside kernels; slow, use small shapes)."),
    Var("PACEKERN_LOG_LEVEL", "info", "debug | profile | info | warning | error. 'profile' prints per-kernel "
        "call counts and time at exit."),
    Var("PACEKERN_CACHE_DIR", "~/.cache/pacekern", "Generated sources, Numba's compiled code, the tuning database and int4 weight codes (int4/)."),
    Var("PACEKERN_MODEL_DIR", "~/.cache/pacekern/models", "Downloaded GGUF files, the Hugging Face directories converted from them, DLRM checkpoints (dlrm/) and evaluation data (data/: Botchan, Lee, MovieLens-100k)."),
    Var("PACEKERN_TUNE", "0", "1 tunes a kernel on its first call for each untuned shape bucket; 0 uses the "
        "tuned config if cached, else the space's default config."),
    Var("PACEKERN_FORCE_TUNE", "0", "1 re-times every config even when the tuning cache has results."),
    Var("PACEKERN_TUNE_BUDGET_S", "60", "Wall-clock budget in seconds for tuning one kernel for one shape bucket."),
    Var("PACEKERN_NUM_THREADS", "", "Threads for parallel kernels and torch (default: all cores)."),
    Var("PACEKERN_PRINT_CODE", "0", "1 prints the path of every generated source file when it is compiled."),
    Var("PACEKERN_ACCEPT", "0", "1 rewrites the golden IR/source snapshots in tests/golden instead of comparing."),
]}


def get(name: str) -> str:
    v = VARS[name]
    val = os.environ.get(name, v.default)
    return os.path.expanduser(val) if name.endswith("_DIR") else val


def flag(name: str) -> bool:
    return get(name).strip().lower() in ("1", "true", "yes", "on")


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | `{v.default or '-'}` | {v.help} |" for v in VARS.values()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
