"""DLRMv2 pipeline: spec, synthetic data, validation, training, INT8 quantization, and pacekern
inference against PyTorch (fp32 module, int8 quantized ops, a float64 fake-quant statement).

Fast everywhere: the pipeline tests use DlrmSpec.micro() (MLPerf's structure with small widths)
so that they also run under PACEKERN_INTERPRET=1; the MLPerf-width model at the tiny preset runs
natively only (the interpreter would take minutes per forward).
"""
import math
import warnings

import pytest
import torch

from pacekern import env
from dlrm import (Batch, BatchError, DLRMv2, DlrmSpec, FakeQuantDlrm, IdOutOfRange, PacekernDlrm, PacekernDlrmFp32,
                  QuantizedDlrm, SyntheticCTR, TorchInt8Dlrm, TrainConfig, auc, load_checkpoint, make_batch, quantize,
                  train, validate)
from dlrm.model import MLPERF_HOTNESS, MLPERF_ROWS
from dlrm.quantize import RangeObserver, equalized_pairs
from pacekern_ops.gemm_u8s8 import torch_int8_saturates

INTERP = env.flag("PACEKERN_INTERPRET")
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:UserWarning")


@pytest.fixture(scope="module")
def micro():
    """A seeded random micro model, its data and its quantized form (8 and 4-bit tables)."""
    spec = DlrmSpec.micro()
    src = SyntheticCTR(spec, seed=1)
    model = DLRMv2(spec, seed=2).eval()
    q = quantize(model, src.stream("calib", 2048, 512), progress=False)
    return spec, src, model, q


# ---------------------------------------------------------------------------------------------
# spec and model

def test_spec_is_mlperf():
    s = DlrmSpec.preset("dev")
    assert s.num_sparse == 26 and s.num_dense == 13 and s.dim == 128 and s.width == 3456
    assert s.bottom == (512, 256, 128) and s.top == (1024, 1024, 512, 256, 1) and (s.dcn_layers, s.dcn_rank) == (3, 512)
    assert s.hotness == MLPERF_HOTNESS and sum(s.hotness) == 214
    assert s.rows == tuple(min(r, 200_000) for r in MLPERF_ROWS)
    pc = s.param_count()
    assert (pc["bottom"], pc["dcn"], pc["top"]) == (171_392, 10_627_200, 5_245_953)     # dlrm.md 1.3
    assert DlrmSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown size preset"):
        DlrmSpec.preset("huge")
    with pytest.raises(ValueError, match="bottom MLP"):
        DlrmSpec(rows=(3,) * 26, bottom=(64, 32))


def test_model_forward_matches_definition(micro):
    """DLRMv2.forward written twice: the module vs the formulas with F.embedding_bag/F.linear."""
    spec, src, model, _ = micro
    b = src.batch("eval", 0, 7)
    with torch.no_grad():
        got = model(b.dense, b.indices, b.offsets)
        x = b.dense
        for i, lin in enumerate(l for l in model.bottom if isinstance(l, torch.nn.Linear)):
            x = torch.relu(lin(x))
        pooled = [x]
        for t, e in enumerate(model.embs):
            idx, off = b.table(t)
            pooled.append(torch.nn.functional.embedding_bag(idx.long(), e.weight, off[:-1].long(), mode="sum"))
        x0 = torch.cat(pooled, 1)
        xl = x0
        for v, w in zip(model.cross.V, model.cross.W):
            xl = x0 * (xl @ v.weight.t() @ w.weight.t() + w.bias) + xl
        lins = [l for l in model.top if isinstance(l, torch.nn.Linear)]
        y = xl
        for i, lin in enumerate(lins):
            y = lin(y) if i == len(lins) - 1 else torch.relu(lin(y))
    torch.testing.assert_close(got, y[:, 0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# data

def test_auc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (300,), generator=g).float()            # many ties
    y = torch.rand(300, generator=g) < 0.3
    pos, neg = s[y], s[~y]
    want = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert abs(auc(s, y) - float(want)) < 1e-12
    assert math.isnan(auc(s, torch.zeros(300)))


def test_synthetic_deterministic_and_calibrated():
    spec = DlrmSpec.preset("tiny")
    a, b = SyntheticCTR(spec, seed=3), SyntheticCTR(spec, seed=3)
    x, y = a.batch("train", 5, 64), b.batch("train", 5, 64)
    assert torch.equal(x.dense, y.dense) and torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
    assert not torch.equal(a.batch("eval", 5, 64).indices, x.indices)                 # splits differ
    validate(x, spec)
    assert x.offsets.tolist()[:4] == [0, 3, 6, 9]                                     # table 0: hotness 3
    e = a.batch("eval", 0, 20_000)
    assert abs(float(e.labels.mean()) - 0.25) < 0.02                                  # ~25% click rate
    assert 0.77 < auc(e.p_true, e.labels) < 0.83                                      # oracle AUC ~0.80
    assert float(e.dense.min()) >= math.log(3) - 1e-6                                 # log(x + 3), x >= 0
    idx, _ = e.table(20)
    assert idx.numel() == 20_000 * 100 and int(idx.max()) < spec.rows[20]
    counts = torch.bincount(e.table(2)[0][::1].long(), minlength=spec.rows[2])
    assert counts.max() > 20 * counts.float().mean()                                  # power-law ids


def test_validate_errors():
    spec = DlrmSpec.micro()
    src = SyntheticCTR(spec, seed=0)
    b = src.batch("eval", 0, 4)
    validate(b, spec)
    with pytest.raises(BatchError, match="expected 13 dense features, got 12"):
        validate(Batch(b.dense[:, :12].contiguous(), b.indices, b.offsets), spec)
    bad = b.dense.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(BatchError, match="dense feature 5 of sample 2 is nan"):
        validate(Batch(bad, b.indices, b.offsets), spec)
    with pytest.raises(BatchError, match="expected 26 sparse features"):
        validate(Batch(b.dense, b.indices, b.offsets[: 25 * 4 + 1].contiguous()), spec)
    idx = b.indices.clone()
    o = int(b.offsets[4 * 4 + 1])                                    # table 4, sample 1
    idx[o] = spec.rows[4]
    with pytest.raises(IdOutOfRange, match=r"sparse feature 4: id 30 of sample 1 is outside its table \[0, 30\)"):
        validate(Batch(b.dense, idx, b.offsets), spec)
    idx[o] = -1
    with pytest.raises(IndexError):
        validate(Batch(b.dense, idx, b.offsets), spec)
    with pytest.raises(BatchError, match="int32"):
        validate(Batch(b.dense, b.indices.long(), b.offsets), spec)


def test_bad_input_reaches_every_path(micro):
    spec, src, model, q = micro
    b = src.batch("eval", 0, 3)
    bad = Batch(b.dense, b.indices.clone(), b.offsets)
    bad.indices[0] = 10_000
    for f in (PacekernDlrm(q, 8), PacekernDlrm(q, 4), PacekernDlrmFp32(model), TorchInt8Dlrm(q), model.predict):
        with pytest.raises(IdOutOfRange):
            f(bad)


def test_make_batch_variable_bags(micro):
    spec, _, model, q = micro
    bags = [[[0], [], [1, 1, 0]] for _ in range(26)]                                    # empty and repeated ids
    b = make_batch(torch.full((3, 13), 1.5), bags)
    validate(b, spec)
    p = PacekernDlrm(q, 8)(b)
    want = torch.sigmoid(FakeQuantDlrm(q, 8).logits(b)).float()
    assert float((p - want).abs().max()) < 1e-3


# ---------------------------------------------------------------------------------------------
# inference paths

def test_pacekern_fp32_matches_torch(micro):
    spec, src, model, _ = micro
    b = src.batch("eval", 1, 37)
    torch.testing.assert_close(PacekernDlrmFp32(model)(b), model.predict(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_matches_references(micro, bits):
    """The quantized model three times: pacekern kernels, PyTorch's quantized ops, float64 fake
    quantization. pacekern does fbgemm's float operations at every rounding point (embedding bags,
    requantization), so it equals PyTorch's ops; float64 differs where rounding moves a value
    across a u8 rounding tie."""
    spec, src, model, q = micro
    b = src.batch("eval", 2, 600)
    p = PacekernDlrm(q, bits)(b)
    t = TorchInt8Dlrm(q, bits)(b)
    f = torch.sigmoid(FakeQuantDlrm(q, bits).logits(b)).float()
    d = (p - f).abs()
    if torch_int8_saturates():
        # PyTorch is the side that differs here (its int16 pair sums saturate): pacekern stays
        # closer to the exact float64 model than PyTorch does
        assert float(d.mean()) < float((t - f).abs().mean())
    else:
        assert float((p - t).abs().max()) <= 1e-6
    assert float(d.mean()) < 1e-3 and float(torch.quantile(d, 0.9)) < 1e-3 and float(d.max()) < 2e-2
    pf = model.predict(b)
    assert float((p - pf).abs().mean()) < 0.02                                          # close to fp32


def test_quantized_save_load(micro, tmp_path):
    spec, src, model, q = micro
    q.save(tmp_path / "q.pt")
    q2 = QuantizedDlrm.load(tmp_path / "q.pt")
    b = src.batch("eval", 3, 16)
    assert torch.equal(PacekernDlrm(q, 8)(b), PacekernDlrm(q2, 8)(b))
    assert torch.equal(PacekernDlrm(q, 4)(b), PacekernDlrm(q2, 4)(b))
    with pytest.raises(FileNotFoundError, match="dlrm quantize"):
        QuantizedDlrm.load(tmp_path / "missing.pt")


class _Exploit:
    """A pickle that runs code when loaded with weights_only=False (writes a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_untrusted_files_are_never_executed(micro, tmp_path):
    """Checkpoints and quantized models load with weights_only=True: a malicious pickle is refused
    (nothing runs) and garbage gets an error naming the file, on both load paths."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"spec": {}, "state": _Exploit(marker)}, evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint" * 10)
    for load in (load_checkpoint, QuantizedDlrm.load):
        for path in (evil, junk):
            with pytest.raises(ValueError, match=f"{path.name} is not a pacekern DLRM"):
                load(path)
    assert not marker.exists()


def test_quantization_recipe(micro):
    """Per-channel symmetric int8 weights; u8 activations with zero point 0 after ReLU."""
    spec, _, model, q = micro
    lins = model.linears()
    for name, ql in q.linears.items():
        assert ql.w.dtype == torch.int8 and int(ql.w.abs().max()) <= 127
        assert ql.w.shape == (lins[name].in_features, lins[name].out_features)
        if ql.out is not None and ql.relu:
            assert ql.out.zp == 0
    assert q.linears["cross.W.0"].out is None and q.linears["top.2"].out is None       # fp32 outputs
    # a producer's u8 output and its consumer's input are one grid (PyTorch's quint8 tensor carries
    # the producer's scale; pacekern reads the codes with the consumer's)
    for prod, cons, _ in equalized_pairs(spec):
        a, b = q.linears[prod].out, q.linears[cons].inp
        assert (a.scale, a.zp) == (b.scale, b.zp), (prod, cons)


def test_range_observer_percentile_is_deterministic():
    """The clipped range of a subsampled observer is the same at every call (it was not: a
    random subsample per call gave a producer and its consumer different scales)."""
    o = RangeObserver(pct=1e-2, keep=1000)
    o(torch.randn(4096, 8))
    assert o.range() == o.range()
    lo, hi = o.range()
    assert -3.0 < lo < -1.5 and 1.5 < hi < 3.0                    # ~ the 1% / 99% quantiles of N(0, 1)


def test_batch_sizes_agree(micro):
    """Batch 1 rows equal the same rows inside a larger batch (AMX / VNNI / tails)."""
    spec, src, model, q = micro
    b = src.batch("eval", 4, 40)
    pk8 = PacekernDlrm(q, 8)
    full = pk8(b)
    for r in (0, 17, 39):
        bags = [[b.table(t)[0][b.table(t)[1][r]:b.table(t)[1][r + 1]].tolist()] for t in range(26)]
        one = pk8(make_batch(b.dense[r:r + 1], bags))
        assert abs(float(one[0]) - float(full[r])) < 1e-6
    # the calls prepared for batch size 40 run on their buffers: a second batch of that size
    # gives what a fresh instance gives, and the first batch again gives its first result
    other = src.batch("eval", 99, 40)
    assert torch.equal(pk8(other), PacekernDlrm(q, 8)(other))
    assert torch.equal(pk8(b), full)


@pytest.mark.skipif(INTERP, reason="the MLPerf-width model takes minutes per forward in the NumPy interpreter")
def test_mlperf_width_tiny_preset():
    spec = DlrmSpec.preset("tiny")
    src = SyntheticCTR(spec, seed=0)
    model = DLRMv2(spec, seed=0).eval()
    q = quantize(model, src.stream("calib", 512, 256), emb_bits=(8,), progress=False)
    b = src.batch("eval", 0, 64)
    p = PacekernDlrm(q, 8)(b)
    d = (p - TorchInt8Dlrm(q, 8)(b)).abs()
    assert float(d.mean()) < 1e-3 and float(d.max()) < 1e-2
    assert float((p - model.predict(b)).abs().max()) < 0.05
    torch.testing.assert_close(PacekernDlrmFp32(model)(b), model.predict(b), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# training and the command line

def test_train_checkpoint_roundtrip(tmp_path):
    spec = DlrmSpec.micro()
    src = SyntheticCTR(spec, seed=0)
    cfg = TrainConfig(rows=4096, batch=256, lr_dense=3e-3, lr_emb=0.1, eval_rows=4096, checkpoint=str(tmp_path / "m.pt"))
    model, m = train(src, cfg, progress=False)
    assert m["auc"] > 0.6 and m["oracle_auc"] > m["auc"]
    m2, meta = load_checkpoint(tmp_path / "m.pt")
    b = src.batch("eval", 0, 8)
    torch.testing.assert_close(m2.predict(b), model.predict(b))
    assert meta["source"]["kind"] == "synthetic" and meta["metrics"]["auc"] == m["auc"]
    short = TrainConfig(rows=512, batch=256, eval_rows=0)
    a, _ = train(src, short, progress=False)
    c, _ = train(src, short, progress=False)
    assert torch.equal(a.top[-1].weight, c.top[-1].weight)                             # deterministic by seed


def test_cli_end_to_end(tmp_path, capsys):
    from dlrm.cli import main
    ck = tmp_path / "m.pt"
    assert main(["train", "--preset", "micro", "--rows", "1024", "--batch", "256", "--eval-rows", "1024",
                 "--out", str(ck)]) == 0
    assert main(["quantize", "--preset", "micro", "--checkpoint", str(ck), "--calib-rows", "1024"]) == 0
    rows = "256" if INTERP else "1024"                            # the interpreter runs ~100x slower
    main(["eval", "--checkpoint", str(ck), "--rows", rows, "--batch", rows, "--match-rows", "128"])
    out = capsys.readouterr().out
    assert "pacekern-int8" in out and "pacekern-int4" in out and "vs torch int8" in out
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert main(["bench", "--preset", "micro", "--batches", "1,8", "--rounds", "1", "--budget", "0.01",
                 "--impls", "pacekern-int8,torch-fp32,torch-int8"]) == 0
    out = capsys.readouterr().out
    assert "| pacekern-int8 | 8 |" in out and "vs torch fp32" in out


def test_facade():
    from pacekern import dlrm as facade
    import dlrm
    for name in dlrm.__all__:
        assert getattr(facade, name) is getattr(dlrm, name)
    assert facade.MovieLens100k is dlrm.MovieLens100k


# ---------------------------------------------------------------------------------------------
# the real dataset (MovieLens-100k from the recbole wheel on PyPI): fetched once (2.1 MB) into the
# model cache, like the LLM tests' models; heavy, so the quick runs never download it

@pytest.mark.heavy
def test_movielens_interface():
    from dlrm.movielens import MovieLens100k
    ml = MovieLens100k(seed=0)
    assert ml.spec.num_sparse == 26 and ml.spec.num_dense == 13 and ml.spec.dim == 128
    assert ml.n == 100_000 and {k: ml.rows_of(k) for k in ml.splits} == {"train": 80_000, "calib": 5_000, "eval": 15_000}
    assert 0.5 < ml.ctr < 0.6
    seen = 0
    for b in ml.stream("eval", 10**9, 4096):
        validate(b, ml.spec)
        seen += b.size
    assert seen == 15_000
    b = next(ml.stream("train", 100, 100))
    assert b.size == 100 and b.dense.shape == (100, 13) and bool(torch.isfinite(b.dense).all())
    assert set(ml.splits["train"].tolist()).isdisjoint(ml.splits["eval"].tolist())


# ---------------------------------------------------------------------------------------------
# the accuracy bars on trained models (heavy: ~1 minute of training each on 2 cores). The full
# measurement is `pacekern dlrm eval --rows 1000000` (see README); these keep a guard on it.

@pytest.mark.heavy
@pytest.mark.parametrize("data", ["synthetic", "movielens"])
def test_int8_auc_bars_on_trained_model(data):
    from dlrm.evaluate import AUC_RATIO_INT4, AUC_RATIO_INT8, evaluate_all
    if data == "synthetic":
        src = SyntheticCTR(DlrmSpec.preset("small"), seed=0)
        eval_rows = 131_072
    else:
        from dlrm.movielens import MovieLens100k
        src = MovieLens100k(seed=0)
        eval_rows = 15_000
    model, _ = train(src, TrainConfig(rows=100_000, batch=512, eval_rows=0), progress=False)
    q = quantize(model, src.stream("calib", 32_768, 4096), progress=False)
    # where PyTorch's int8 saturates it is no reference (test_int8_matches_references shows which
    # side differs there), and the slowest path: skip the match
    match_rows = 0 if torch_int8_saturates() else 8192
    rep = evaluate_all(model, q, src.stream("eval", eval_rows, 4096), match_rows=match_rows, progress=False)
    print(rep.table())
    assert rep.auc["fp32"] > 0.68                                   # a trained model, not a random one
    assert rep.ratio("pacekern-int8") >= AUC_RATIO_INT8
    assert rep.ratio("pacekern-int4") >= AUC_RATIO_INT4
    assert rep.match_rows == match_rows and (not match_rows or rep.diff_vs_torch_int8["max"] <= 1e-3)
