"""4-bit weight GEMV (pacekern_ops/gemv_int4.py) against PyTorch: the kernel against the float64
result for its quantized inputs, the whole linear against torch's own int4 matmul, the quantizers'
error bounds, and its machine code."""
import pytest
import torch

import pacekern as pk
from conftest import INTERPRET, needs_compiled_avx512
from pacekern_ops.gemv_int4 import (activation_buffers, dequantize_int4, from_chunk_order, gemv_int4,
                                    gemv_int4_linear, quantize_int4, quantize_x8, to_chunk_order, torch_int4_pack)

SHAPES = [(1, 1, 16), (1, 37, 50), (3, 64, 576), (8, 48, 1536)] if not INTERPRET else [(1, 1, 16), (2, 9, 40)]
CONFIGS = [pk.Config.of(R=2, NB=64, PF=512), pk.Config.of(R=4, NB=16, PF=0), pk.Config.of(R=6, NB=128, PF=2048)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_int4(m, n, k, cfg):
    x, y = torch.randn(m, k), torch.empty(m, n)
    w, ws, wm = quantize_int4(torch.randn(n, k))
    xq, xs, xm = activation_buffers(m, k)
    quantize_x8(x, xq, xs, xm)
    pk.check(gemv_int4, xq, xs, xm, w, ws, wm, y, config=cfg)      # against float64 for the quantized x it is given
    # against unquantized x: int8 per group of 32 (error <= scale / 2 per element)
    ref = x.double() @ dequantize_int4(w, ws, wm, k).double().t()
    err_x = (xs.double().repeat_interleave(32, 1)[:, :k] / 2)
    bound = err_x @ dequantize_int4(w, ws, wm, k).double().abs().t() * 1.001 + 1e-4
    assert ((y.double() - ref).abs() <= bound).all()


def test_quantize_x8_round_trip_and_group_sums():
    x = torch.randn(3, 600) * 10
    x[1] = 0.0                                                       # an all-zero row
    xq, xs, xm = activation_buffers(3, 600)
    quantize_x8(x, xq, xs, xm)
    q = from_chunk_order(xq.double())
    back = (q * xs.double().repeat_interleave(32, 1))[:, :600]
    assert ((back - x.double()).abs() <= xs.double().repeat_interleave(32, 1)[:, :600] / 2 * (1 + 1e-6)).all()
    assert torch.equal(q[:, 600:], torch.zeros(3, q.shape[1] - 600, dtype=torch.float64))   # padding is 0
    torch.testing.assert_close(xm.double(), xs.double() * q.view(3, -1, 32).sum(-1), rtol=1e-6, atol=0)
    assert torch.equal(back[1], torch.zeros(600, dtype=torch.float64))


def test_chunk_order_is_a_permutation():
    k = torch.arange(1024)
    perm = to_chunk_order(k)
    assert torch.equal(from_chunk_order(perm), k) and torch.equal(perm.sort().values, k)
    # group j of a block sits in lane j (bytes 4j..4j+3) of each 64-byte chunk
    assert torch.equal(perm[64 * 2 + 4 * 5: 64 * 2 + 4 * 5 + 4], torch.tensor([32 * 5 + 8, 32 * 5 + 9, 32 * 5 + 10, 32 * 5 + 11]))


def test_quantize_int4_error_and_grid():
    w = torch.randn(64, 256)
    q, s, mn = quantize_int4(w)
    deq = dequantize_int4(q, s, mn, 256)
    assert float((deq - w).norm() / w.norm()) < 0.09            # 16 levels per 32 Gaussian weights: ~0.075
    # a tensor already on a 16-level grid per 32-group (a Q4_1 / Q4_K source) comes back to bf16 precision
    grid_s, grid_m = torch.rand(64, 8, 1) * 0.1 + 0.01, torch.randn(64, 8, 1) * 0.1
    codes = torch.randint(0, 16, (64, 8, 32)).float()
    codes[:, :, 0] = 3                                               # levels that do not span 0..15
    codes[:, :, 1:].clamp_(2, 13)
    src = (codes * grid_s + grid_m).view(64, 256)
    q, s, mn = quantize_int4(src)
    assert float((dequantize_int4(q, s, mn, 256) - src).norm() / src.norm()) < 0.01


def test_int4_linear_matches_torch_int4_matmul():
    """The same 4-bit weights through PyTorch's own CPU int4 matmul (fp32 activations)."""
    x, y = torch.randn(2, 1024), torch.empty(2, 96)
    w, ws, wm = quantize_int4(torch.randn(96, 1024))
    gemv_int4_linear(x, w, ws, wm, y)
    wp, scales_zeros = torch_int4_pack(w, ws, wm, 1024)
    ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x, wp, 32, scales_zeros)
    torch.testing.assert_close(y, ref, rtol=0.02, atol=0.02 * float(ref.abs().max()))


def test_int4_linear_bad_shapes():
    w, ws, wm = quantize_int4(torch.randn(8, 600))
    with pytest.raises(ValueError, match="do not fit x with K=512"):
        gemv_int4_linear(torch.randn(1, 512), w, ws, wm, torch.empty(1, 8))
    with pytest.raises(ValueError, match="multiple of 32 and N of 16"):
        torch_int4_pack(w, ws, wm, 600)


def test_inner_loop_streams_in_zmm_without_spills():
    reason = needs_compiled_avx512()
    if reason:
        pytest.skip(reason)
    r = gemv_int4.asm(pk.Config.of(R=2, NB=64, PF=512))
    assert r.inner_spills == 0 and r.zmm_registers >= 8 and r.counts.get("vpdpbusd", 0) >= 16, r.summary()


def test_int4_codes_are_cached_and_a_damaged_cache_is_rebuilt(tmp_path):
    from safetensors.torch import save_file
    from llm.weights import Int4Codes
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(32, 64)}, str(src))
    w = torch.randn(32, 64)
    first = Int4Codes([src], cache_dir=tmp_path / "cache")
    a = first.make("layer.o", w)
    first.save()
    second = Int4Codes([src], cache_dir=tmp_path / "cache")
    assert "layer.o.w" in second.cached                             # read back, not quantized again
    b = second.make("layer.o", w)
    assert torch.equal(a.w, b.w) and torch.equal(a.scale, b.scale) and torch.equal(a.mins, b.mins) and b.k == 64
    assert not second.new
    first.path.write_bytes(b"not a safetensors file")
    third = Int4Codes([src], cache_dir=tmp_path / "cache")
    assert not third.cached                                         # ignored (with a warning), then rebuilt
    assert torch.equal(third.make("layer.o", w).w, a.w)
    third.save()
    assert "layer.o.w" in Int4Codes([src], cache_dir=tmp_path / "cache").cached


@pytest.mark.parametrize("four_bit_source", [False, True])
def test_int4_model_keeps_a_head_int8_unless_it_was_4_bit(tmp_path, monkeypatch, four_bit_source):
    """weights="int4": the LM head goes to 4 bits only when that loses (almost) nothing, i.e. when its
    source was already on a 4-bit grid; otherwise it stays int8 (SmolLM2's tied head, Q8_0 in its GGUF)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from llm.weights import HEAD_INT4_MAX_ERROR, Int4Codes, ModelSpec, load
    monkeypatch.setenv("PACEKERN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if four_bit_source:                                              # the embedding/head as a 4-bit file would hold it
        e = model.model.embed_tokens.weight
        q, s, mn = quantize_int4(e.detach())
        with torch.no_grad():
            e.copy_(dequantize_int4(q, s, mn, e.shape[1]))
    model.save_pretrained(tmp_path / "m")
    w = load(tmp_path / "m", ModelSpec.from_dir(tmp_path / "m"), "int4")
    assert w.layers[0].gate_up.fmt == "int4"
    assert w.lm_head.fmt == ("int4" if four_bit_source else "int8")
    err = Int4Codes(sorted((tmp_path / "m").glob("*.safetensors"))).cached["lm_head.err"]
    assert (float(err) <= HEAD_INT4_MAX_ERROR) == four_bit_source     # the decision's input is cached with the codes
    torch.testing.assert_close(w.lm_head.dequantized(), model.lm_head.weight.detach(), rtol=0, atol=0.02 * float(w.embed.abs().max()))


def test_decode_bytes_count_what_is_stored(tmp_path, monkeypatch):
    """Weights.decode_bytes (bench llm's roofline): exactly 2 bytes per weight in bf16; in int4 the
    codes of K padded to 512, the bf16 scale and min per 32, and the int8 head with its row data."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from llm.weights import ModelSpec, load
    monkeypatch.setenv("PACEKERN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    spec = ModelSpec.from_dir(tmp_path / "m")
    assert load(tmp_path / "m", spec, "bf16").decode_bytes() == spec.weight_bytes("bf16")
    w = load(tmp_path / "m", spec, "int4")
    rows = (64 + 2 * 32) + 64 + 2 * 128 + 64                         # qkv, o, gate_up, down; K (64, 128) -> 512
    int4 = rows * (512 // 2 + 2 * 2 * 512 // 32)                      # 4-bit codes + bf16 scale and min per 32
    assert w.lm_head.fmt == "int8"
    assert w.decode_bytes() == int4 + 96 * 64 + 96 * 4 + 96 * 4      # head: int8 codes, f32 scale, i32 row sums
