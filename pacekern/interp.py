"""PACEKERN_INTERPRET=1: the generated kernel source runs as plain Python over these NumPy
emulations of the intrinsics in pacekern/isa.py (same names, same semantics), so print() and
pdb work inside kernels. A vector is a 1-D NumPy array of its lanes. Slow: use small shapes.
"""
from __future__ import annotations

import numpy as np


def njit(*args, **kwargs):
    if args and callable(args[0]):
        return args[0]
    return lambda f: f


prange = range

_NP = {"f32x16": (np.float32, 16), "i32x16": (np.int32, 16), "u8x64": (np.uint8, 64), "s8x64": (np.int8, 64),
       "bf16x32": (np.int16, 32)}


def _check(arr, idx, n, name):
    if n > 0 and (idx < 0 or idx + n > arr.shape[0]):     # no lane accessed (a masked tail past the end): no fault
        raise IndexError(f"{name}: lanes [{idx}, {idx + n}) out of bounds for an array of {arr.shape[0]} elements")


def _make(vt):
    dt, lanes = _NP[vt]

    def zeros():
        return np.zeros(lanes, dt)

    def bcast(x):
        return np.full(lanes, x, dt)

    def load(arr, idx):
        _check(arr, idx, lanes, f"{vt}.load")
        return arr[idx: idx + lanes].astype(dt, copy=True)

    def load_masked(arr, idx, n):
        n = max(0, min(int(n), lanes))
        _check(arr, idx, n, f"{vt}.load(n={n})")
        out = np.zeros(lanes, dt)
        out[:n] = arr[idx: idx + n]
        return out
    return zeros, bcast, load, load_masked


for _vt in _NP:
    (globals()[f"{_vt}_zeros"], globals()[f"{_vt}_bcast"], globals()[f"{_vt}_load"],
     globals()[f"{_vt}_load_masked"]) = _make(_vt)


def ld(arr, idx):
    _check(arr, idx, 1, "load")
    return arr[idx].item()


def st(arr, idx, v):
    _check(arr, idx, 1, "store")
    arr[idx] = v


def store(arr, idx, v):
    _check(arr, idx, v.shape[0], "store")
    arr[idx: idx + v.shape[0]] = v


def store_masked(arr, idx, v, n):
    n = max(0, min(int(n), v.shape[0]))
    _check(arr, idx, n, f"store(n={n})")
    arr[idx: idx + n] = v[:n]


def _bf16_to_f32(bits):
    return (bits.astype(np.int16).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32x16_load_bf16(arr, idx):
    _check(arr, idx, 16, "f32x16.load_bf16")
    return _bf16_to_f32(arr[idx: idx + 16])


def f32x16_load_bf16_masked(arr, idx, n):
    out = np.zeros(16, np.int16)
    n = max(0, min(int(n), 16))
    _check(arr, idx, n, "f32x16.load_bf16")
    out[:n] = arr[idx: idx + n]
    return _bf16_to_f32(out)


def f32x16_load_s8(arr, idx):
    _check(arr, idx, 16, "f32x16.load_s8")
    return arr[idx: idx + 16].astype(np.float32)


def f32x16_load_s8_masked(arr, idx, n):
    out = np.zeros(16, np.float32)
    n = max(0, min(int(n), 16))
    _check(arr, idx, n, "f32x16.load_s8")
    out[:n] = arr[idx: idx + n]
    return out


def _f32_to_bf16(v):
    u = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    r = np.where(np.isnan(v), ((u >> 16) | 0x40) & 0xFFFF, r)
    return r.astype(np.uint16).view(np.int16)


def store_bf16(arr, idx, v):
    _check(arr, idx, 16, "store_bf16")
    arr[idx: idx + 16] = _f32_to_bf16(v)


def store_bf16_masked(arr, idx, v, n):
    n = max(0, min(int(n), 16))
    _check(arr, idx, n, f"store_bf16(n={n})")
    arr[idx: idx + n] = _f32_to_bf16(v)[:n]


def f32_to_bf16_bits(v):
    out = np.zeros(32, np.int16)
    out[:16] = _f32_to_bf16(v)
    return out


def bitcast(a, to):
    return a.view(_NP[to][0]).copy()


def add(a, b):
    return (a + b).astype(a.dtype)


def sub(a, b):
    return (a - b).astype(a.dtype)


def mul(a, b):
    return (a * b).astype(a.dtype)


def div(a, b):
    return (a / b).astype(a.dtype) if a.dtype == np.float32 else (a // b).astype(a.dtype)


def fma(a, b, c):
    return (a.astype(np.float64) * b + c).astype(np.float32)


def vmax(a, b):
    return np.fmax(a, b)


def vmin(a, b):
    return np.fmin(a, b)


def neg(a):
    return -a


def hsum(a):
    return a.sum(dtype=a.dtype).item() if a.dtype != np.float32 else float(np.float32(a.astype(np.float64).sum()))


def hmax(a):
    return a.max().item()


def hmin(a):
    return a.min().item()


def sqrt(a):
    return np.sqrt(a)


def exp(a):
    with np.errstate(over="ignore", under="ignore"):
        return np.exp(np.asarray(a, np.float64)).astype(np.float32)[()]


def cast_f32_i32(a):
    return np.round(a).astype(np.int32)


def cast_i32_f32(a):
    return a.astype(np.float32)


def dot4_u8s8_generic(acc, a, b):
    return (acc.astype(np.int64) + (a.astype(np.int64) * b.astype(np.int64)).reshape(16, 4).sum(1)).astype(np.int32)


dot4_u8s8_vnni = dot4_u8s8_avx2 = dot4_u8s8_avx512 = dot4_u8s8_generic


def dot2_bf16_generic(acc, a, b):
    pa, pb = _bf16_to_f32(a).astype(np.float64), _bf16_to_f32(b).astype(np.float64)
    return (acc + (pa * pb).reshape(16, 2).sum(1)).astype(np.float32)


dot2_bf16_avx512bf16 = dot2_bf16_generic


# ---- AMX: eight tile registers emulated as NumPy arrays, shaped by the last amx_config
_tiles: dict = {}
_shape: dict = {}


def amx_config(cfg, idx):
    cfg = cfg[idx: idx + 64]
    colsb = cfg[16:48].view(np.uint16)
    for t in range(8):
        _shape[t] = (int(cfg[48 + t]), int(colsb[t]))


def amx_zero(t):
    _tiles[t] = np.zeros(_shape[t][0] * _shape[t][1], np.uint8)


def amx_load(t, arr, idx, stride):
    rows, colsb = _shape[t]
    raw = arr.view(np.uint8)
    base = idx * arr.itemsize
    _tiles[t] = np.concatenate([raw[base + r * stride: base + r * stride + colsb] for r in range(rows)])


def amx_store(t, arr, idx, stride):
    rows, colsb = _shape[t]
    raw = arr.view(np.uint8)
    base = idx * arr.itemsize
    for r in range(rows):
        raw[base + r * stride: base + r * stride + colsb] = _tiles[t][r * colsb: (r + 1) * colsb]


def amx_dot_u8s8(c, a, b):
    (m, kb), (kr, nb) = _shape[a], _shape[b]
    A = _tiles[a].reshape(m, kb).astype(np.int64)                        # u8 [m, K]
    B = _tiles[b].view(np.int8).reshape(kr, nb // 4, 4).astype(np.int64)  # s8 [K/4, n, 4]
    C = _tiles[c].view(np.int32).reshape(m, nb // 4).astype(np.int64)
    C += np.einsum("mkj,knj->mn", A.reshape(m, kr, 4), B)
    _tiles[c] = C.astype(np.int32).view(np.uint8).reshape(-1)


def amx_dot_bf16(c, a, b):
    (m, kb), (kr, nb) = _shape[a], _shape[b]
    A = _bf16_to_f32(_tiles[a].view(np.int16)).reshape(m, kr, 2).astype(np.float64)
    B = _bf16_to_f32(_tiles[b].view(np.int16)).reshape(kr, nb // 4, 2).astype(np.float64)
    C = _tiles[c].view(np.float32).reshape(m, nb // 4).astype(np.float64)
    C += np.einsum("mkj,knj->mn", A, B)
    _tiles[c] = C.astype(np.float32).view(np.uint8).reshape(-1)


def amx_release():
    _tiles.clear()


def cast_i32_u8(a):
    out = np.zeros(64, np.uint8)
    out[:16] = np.clip(a.astype(np.int64), 0, 255)
    return out


def cast_i32_s8(a):
    out = np.zeros(64, np.int8)
    out[:16] = np.clip(a.astype(np.int64), -128, 127)
    return out


def low_nibbles(a):
    return a & np.uint8(15)


def high_nibbles(a):
    return a >> np.uint8(4)


def prefetch(arr, idx):
    """A cache hint: nothing to emulate (and, like the instruction, never an error)."""
