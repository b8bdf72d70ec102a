"""pacekern: CPU kernels in Python, lowered through Numba/LLVM to AVX512 (VNNI, BF16, AMX),
checked against PyTorch, autotuned and cached.  `import pacekern as pk`."""
from .lang import (Config, Dim, Out, Space, bf16, bf16x32, cdiv, choice, dims, f32, f32x16, func, i16, i32,
                   i32x16, i64, kernel, pow2, prange, s8, s8x64, scratch, tile, u8, u8x64, unroll)
from .lang import OPS as _OPS, _not_python
from .frontend import PkSyntaxError
from .runtime import CompiledKernel, Kernel, KernelSpec, PkArgError
from .passes import CompileError
from .target import cpu as target, set_num_threads

__version__ = "0.1.0"
from .check import CheckError, CheckResult, check

# kernel ops (pk.fma, pk.store, pk.max, ...): names for editors; calling one outside a kernel is an error
for _name in _OPS:
    globals()[_name] = _not_python(_name)
del _name
from .tuner import TuneResult, tune
