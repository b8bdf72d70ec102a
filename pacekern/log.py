"""Logging with PACEKERN_LOG_LEVEL, and the per-kernel profile printed at exit in 'profile' mode."""
from __future__ import annotations

import atexit
import logging
import sys
import time
from collections import defaultdict

from . import env

PROFILE = logging.INFO - 5
logging.addLevelName(PROFILE, "PROFILE")
_LEVELS = {"debug": logging.DEBUG, "profile": PROFILE, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

log = logging.getLogger("pacekern")
if not log.handlers:
    _h = logging.StreamHandler(sys.stderr)
    _h.setFormatter(logging.Formatter("[pacekern] %(levelname)s %(message)s"))
    log.addHandler(_h)
    log.propagate = False
_level = env.get("PACEKERN_LOG_LEVEL").lower()
if _level not in _LEVELS:
    log.setLevel(logging.INFO)
    log.warning("PACEKERN_LOG_LEVEL=%r is not one of %s; using info", _level, "|".join(_LEVELS))
else:
    log.setLevel(_LEVELS[_level])

PROFILING = log.isEnabledFor(PROFILE) and _level in ("profile", "debug")
_calls = defaultdict(lambda: [0, 0.0])          # kernel name -> [calls, seconds]
_warned: set = set()


def record(name: str, seconds: float):
    c = _calls[name]
    c[0] += 1
    c[1] += seconds


def warn_once(key: str, msg: str, *args):
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def profile_report() -> str:
    if not _calls:
        return "no kernel calls"
    rows = [f"{'kernel':32s} {'calls':>8s} {'total ms':>10s} {'us/call':>10s}"]
    for name, (n, t) in sorted(_calls.items(), key=lambda kv: -kv[1][1]):
        rows.append(f"{name:32s} {n:8d} {t * 1e3:10.2f} {t / n * 1e6:10.1f}")
    return "\n".join(rows)


@atexit.register
def _at_exit():
    if PROFILING and _calls:
        print("[pacekern] profile (time spent in kernel calls):\n" + profile_report(), file=sys.stderr)


now = time.perf_counter
