"""The persistent tuning database: one row per measured (kernel key, config).

The key is a hash of everything a timing depends on (see `key_parts`); each part is also stored
in clear for `pacekern cache ls`. The winner is derived from the rows, never stored alone, so
adding a config to a space times only that config. A corrupt database file is moved aside with a
warning and rebuilt; it never stops a kernel from running.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from . import env
from .lang import Config
from .log import log

SCHEMA = 1


@dataclass(frozen=True)
class TuneRecord:
    config: Config
    status: str               # 'ok' | 'wrong' (disagrees with ref) | 'error' (did not compile) | 'timeout'
    time_s: float             # median seconds per call (ok only)
    iqr_s: float              # interquartile range of the samples
    compile_s: float
    detail: str = ""          # error or mismatch message


def key_parts(kernel, bucket: tuple) -> dict:
    """Everything a tuned config depends on, as readable strings."""
    import llvmlite
    import llvmlite.binding as llb
    import numba
    from . import __version__
    from .codegen import isa_hash
    from .target import cpu
    try:
        import torch
        tv = torch.__version__
    except ImportError:
        tv = "-"
    return {
        "pacekern": f"{__version__} intrinsics {isa_hash()}",
        "versions": f"numba {numba.__version__} llvmlite {llvmlite.__version__} llvm {'.'.join(map(str, llb.llvm_version_info))} torch {tv}",
        "cpu": cpu().fingerprint(),
        "kernel": f"{kernel.name} {kernel.spec.source_hash}",
        "dtypes": ",".join(f"{p.name}:{p.dtype}[{','.join(map(str, p.shape))}]" for p in kernel.spec.ir.params),
        "bucket": ",".join(f"{k}={v}" for k, v in bucket),
        "env": " ".join(f"{k}={os.environ.get(k, '')}" for k in ("PACEKERN_ISA", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES",
                                                                 "NUMBA_THREADING_LAYER", "NUMBA_OPT")),
    }


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _path() -> Path:
    d = Path(env.get("PACEKERN_CACHE_DIR"))
    d.mkdir(parents=True, exist_ok=True)
    return d / "tune.sqlite"


def _connect() -> sqlite3.Connection:
    path = _path()
    for attempt in range(2):
        try:
            db = sqlite3.connect(path, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS records (key TEXT, kernel TEXT, config TEXT, status TEXT, time_s REAL, "
                       "iqr_s REAL, compile_s REAL, detail TEXT, date REAL, parts TEXT, PRIMARY KEY (key, config))")
            db.execute("CREATE TABLE IF NOT EXISTS meta (schema INTEGER)")
            row = db.execute("SELECT schema FROM meta").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES (?)", (SCHEMA,))
            elif row[0] != SCHEMA:
                raise sqlite3.DatabaseError(f"schema {row[0]} != {SCHEMA}")
            db.commit()
            return db
        except sqlite3.DatabaseError as e:
            if attempt:
                raise
            aside = path.with_suffix(f".corrupt-{int(time.time())}")
            log.warning("tuning cache %s is unreadable (%s); moved it to %s and starting a new one", path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(path) + suffix)
                if p.exists():
                    os.replace(p, Path(str(aside) + suffix))
    raise AssertionError("unreachable")


def records(key: str) -> list:
    db = _connect()
    try:
        rows = db.execute("SELECT config, status, time_s, iqr_s, compile_s, detail FROM records WHERE key = ?", (key,)).fetchall()
    finally:
        db.close()
    out = []
    for cfg, status, t, iqr, cs, detail in rows:
        try:
            out.append(TuneRecord(Config(tuple((k, v) for k, v in json.loads(cfg))), status, t, iqr, cs, detail))
        except (ValueError, TypeError):
            continue                                  # a malformed row is skipped, not fatal
    return out


def put(key: str, kernel: str, parts: dict, recs: list):
    db = _connect()
    try:
        db.executemany("INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?,?,?,?)",
                       [(key, kernel, json.dumps([list(kv) for kv in r.config.values]), r.status, r.time_s, r.iqr_s,
                         r.compile_s, r.detail[:2000], time.time(), json.dumps(parts)) for r in recs])
        db.commit()
    finally:
        db.close()


def summary() -> list:
    """(kernel, bucket, configs measured, best time, best config) per key."""
    db = _connect()
    try:
        rows = db.execute("SELECT key, kernel, parts, config, status, time_s FROM records").fetchall()
    finally:
        db.close()
    by = {}
    for key, kernel, parts, cfg, status, t in rows:
        e = by.setdefault(key, {"kernel": kernel, "bucket": json.loads(parts).get("bucket", ""), "n": 0, "best": None})
        e["n"] += 1
        if status == "ok" and (e["best"] is None or t < e["best"][0]):
            e["best"] = (t, cfg)
    return list(by.values())


def clear() -> int:
    """Delete the tuning database and every generated source/compiled file; returns files removed."""
    import shutil
    root = Path(env.get("PACEKERN_CACHE_DIR"))
    n = sum(1 for _ in root.rglob("*")) if root.exists() else 0
    for sub in ("src", "tune.sqlite", "tune.sqlite-wal", "tune.sqlite-shm", "limits.json"):
        p = root / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return n
