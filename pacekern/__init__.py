"""pacekern: CPU kernels in Python, lowered through Numba/LLVM to AVX512 (VNNI, BF16, AMX),
checked against PyTorch, autotuned and cached.  `import pacekern as pk`."""
from .lang import (Config, Dim, Out, Space, bf16, bf16x32, cdiv, choice, dims, f32, f32x16, func, i16, i32,
                   i32x16, i64, kernel, pow2, prange, s8, s8x64, tile, u8, u8x64, unroll)
from .lang import (amx_config, amx_dot_bf16, amx_dot_u8s8, amx_load, amx_release, amx_store, amx_zero, bitcast,
                   dot2_bf16, dot4_u8s8, exp, fma, hmax, hmin, hsum, max, min, sqrt, store, store_bf16, to_bf16,
                   to_f32, to_i32)
from .frontend import PkSyntaxError
from .runtime import CompiledKernel, Kernel, KernelSpec, PkArgError
from .passes import CompileError
from .target import cpu as target, set_num_threads

__version__ = "0.1.0"
