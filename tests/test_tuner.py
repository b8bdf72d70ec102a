"""The tuner and its cache: validation, persistence, corruption, and a warm second process."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import pacekern as pk
from conftest import INTERPRET
from pacekern import cache, tuner

pytestmark = pytest.mark.skipif(INTERPRET, reason="tuning times compiled code; the interpreter has none")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PACEKERN_CACHE_DIR", str(tmp_path))
    tuner._memo.clear()
    yield tmp_path
    tuner._memo.clear()


N = pk.dims("N")


def _ref_scale(x, y):
    return 2.0 * x


@pk.kernel(space=pk.Space(U=pk.choice(1, 2, 4), P=pk.choice(0, 1)), ref=_ref_scale)
def _scale(x: pk.f32[N], y: pk.Out[pk.f32[N]], *, U, P):
    """y = 2x with U vectors per step; P only multiplies the space (both values are correct)."""
    for i in pk.prange(0, N, 16 * U):
        for u in pk.unroll(U):
            if P == 1:
                pk.prefetch(x[min(i + 256, N - 1)])
            pk.store(y[i + 16 * u], pk.f32x16.load(x[i + 16 * u], n=N - i - 16 * u) * 2.0, n=N - i - 16 * u)


@pk.kernel(space=pk.Space(SKIP=pk.choice(0, 1), default=dict(SKIP=0)), ref=_ref_scale)
def _scale_tail(x: pk.f32[N], y: pk.Out[pk.f32[N]], *, SKIP):
    """y = 2x; SKIP=1 is a broken config that leaves the partial last vector unwritten."""
    for i in pk.prange(0, N - 16 * SKIP, 16):
        pk.store(y[i], pk.f32x16.load(x[i], n=N - i) * 2.0, n=N - i)


def test_check_rejects_a_skipped_tail_even_after_a_correct_run(cache_dir):
    """The output already holds the right answer (the correct config ran first on the same
    buffers, as in the tuner): the broken config must still fail, and the tuner must not pick it."""
    x, y = torch.randn(1000), torch.empty(1000)
    pk.check(_scale_tail, x, y, config=pk.Config(SKIP=0))
    with pytest.raises(pk.CheckError, match="elements differ"):
        pk.check(_scale_tail, x, y, config=pk.Config(SKIP=1))
    res = pk.tune(_scale_tail, x, y, budget_s=60)
    assert res.best == pk.Config(SKIP=0)
    assert [r.status for r in res.records if r.config == pk.Config(SKIP=1)] == ["wrong"]


def test_compare_scale_ignores_non_finite_reference_values():
    """A NaN or inf in the reference must not widen the tolerance for the finite values beside it."""
    from pacekern.check import compare
    for bad in (float("nan"), float("inf")):
        want = torch.tensor([bad, 1.0, 2.0])
        assert not compare("y", torch.tensor([bad, 1.0, 5.0]), want, "f32").ok
        assert compare("y", torch.tensor([bad, 1.0, 2.0]), want, "f32").ok


def _small_gemv():
    """A small kernel whose whole space (6 configs) is measured in one tuning run."""
    return _scale, (torch.randn(4000), torch.empty(4000))


def test_tune_validates_records_and_reuses(cache_dir):
    k, args = _small_gemv()
    res = pk.tune(k, *args, budget_s=60)
    ok = [r for r in res.records if r.status == "ok"]
    assert res.best in {r.config for r in ok} and res.new == len(res.records) >= 1
    assert res.pin_line().startswith("_scale.pin(pk.Config(")
    assert tuner.cached_best(k, k.bucket(k.bind(args).dims)) == res.best
    again = pk.tune(k, *args, budget_s=60)                    # everything known: nothing new is timed
    assert again.new == 0 and again.best in {r.config for r in ok}


def test_pin_line_pastes_and_configs_take_every_form(cache_dir):
    """The line `pacekern tune` prints runs as printed; a config is the same written as keywords,
    a dict, pairs, or in another order, wherever a kernel takes one."""
    k, args = _small_gemv()
    res = pk.tune(k, *args, budget_s=60)
    try:
        eval(res.pin_line(), {"pk": pk, "_scale": k})
        assert k.config_for(k.bind(args)) == res.best
    finally:
        k._pinned.clear()
        k._chosen.clear()
    forms = [pk.Config(U=2, P=0), pk.Config({"U": 2, "P": 0}), pk.Config((("U", 2), ("P", 0))), pk.Config.of(U=2, P=0)]
    assert len(set(forms)) == 1 and repr(forms[0]) == "pk.Config(U=2, P=0)"
    assert k.resolve_config(pk.Config(P=0, U=2)) == forms[0] == k.resolve_config({"P": 0, "U": 2})
    assert k.source({"U": 2, "P": 0}) == k.source(forms[0]) and k.show_ir({"U": 2, "P": 0})
    y = torch.empty(4000)
    k(args[0], y, config={"P": 1, "U": 4})
    assert torch.equal(y, 2 * args[0])
    with pytest.raises(TypeError, match="pk.Config"):
        k(args[0], y, config=[2, 0])
    M, = pk.dims("M")                                          # one name unpacks like several
    assert repr(M) == "M" and repr(pk.dims("M")) == "M"


def test_wrong_configs_are_rejected(cache_dir):
    k, args = _small_gemv()
    bad_ref = lambda x, y: 2.0 * x + 1.0                        # a reference every config disagrees with
    orig = k.spec
    object.__setattr__(k, "spec", orig.__class__(**{**orig.__dict__, "ref": bad_ref}))
    try:
        res = pk.tune(k, *args, budget_s=30, force=True)
    finally:
        object.__setattr__(k, "spec", orig)
    assert all(r.status == "wrong" for r in res.records) and "differ" in res.records[0].detail


def test_corrupt_cache_is_ignored_and_rebuilt(cache_dir, caplog):
    (cache_dir / "tune.sqlite").write_bytes(b"this is not a database" * 100)
    k, args = _small_gemv()
    assert tuner.cached_best(k, k.bucket(k.bind(args).dims)) is None
    assert any(p.name.startswith("tune.corrupt-") for p in cache_dir.iterdir())
    assert cache.records("nothing") == []


def test_second_process_is_warm(tmp_path):
    """A tuned kernel called from a fresh process compiles nothing and tunes nothing: < 1 s."""
    script = tmp_path / "warm.py"
    script.write_text(textwrap.dedent("""
        import json, sys, time, torch
        from pacekern_ops.gemv import gemv_bf16
        import pacekern as pk
        x, w, y = torch.randn(1, 256), torch.randn(4096, 256).bfloat16(), torch.empty(1, 4096)
        if sys.argv[1] == "tune":
            pk.tune(gemv_bf16, x, w, y, budget_s=60)
        t0 = time.perf_counter()
        gemv_bf16(x, w, y)
        first = time.perf_counter() - t0
        from numba.core.dispatcher import Dispatcher
        print(json.dumps({"first_call_s": first}))
    """))
    env = dict(os.environ, PACEKERN_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=os.getcwd())
    subprocess.run([sys.executable, str(script), "tune"], env=env, check=True, capture_output=True)
    out = subprocess.run([sys.executable, str(script), "call"], env=env, check=True, capture_output=True, text=True)
    import json
    first = json.loads(out.stdout.strip().splitlines()[-1])["first_call_s"]
    assert first < 1.0, f"first call in a warm process took {first:.2f}s"


def test_fully_cached_tuning_returns_the_cached_best(cache_dir):
    """Regression: when every config of the space is already in the cache, the best must still be
    derived from the cached records (not fall back to the default with a warning)."""
    k, args = _small_gemv()
    first = pk.tune(k, *args, budget_s=60)
    assert len(first.records) <= tuner.FULL_SEARCH_MAX          # the whole space was measured
    tuner._memo.clear()
    again = pk.tune(k, *args, budget_s=60)
    assert again.new == 0 and again.best == first.best and again.best_s == first.best_s


def test_pattern_search_starts_where_asked(cache_dir, monkeypatch):
    """start= (e.g. the config a plan uses untuned) is measured first, then the space's default."""
    monkeypatch.setattr(tuner, "FULL_SEARCH_MAX", 2)              # force the pattern search on a small space
    k, args = _small_gemv()
    start = pk.Config.of(U=4, P=1)
    res = pk.tune(k, *args, budget_s=60, start=start)
    assert [r.config for r in res.records[:2]] == [start, k.spec.space.default_config()]
    assert res.best in {r.config for r in res.records if r.status == "ok"}
