"""experiments/pard_train.py: the PARD training batch (multi-block input, 4-D mask, COD, labels) gives
every kept position exactly the logits the draft computes for it at inference (prefix + masks,
plain causal attention), checked on a tiny random Llama with sdpa and eager attention."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("pard_train", Path(__file__).parents[1] / "experiments" / "pard_train.py")
pt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pt)

V, M = 60, 59                                       # tiny vocab; the last id is the mask token


def tiny(attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def mask_by_hand(b, j):
    """pard.md Appendix A, one pair at a time."""
    n = len(b)
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            i, jq, i2, jk = int(b[q]), int(j[q]), int(b[k]), int(j[k])
            out[q, k] = ((i == 0 and i2 == 0 and jk <= jq) or (i >= 1 and i2 == 0 and jk <= jq - i)
                         or (i >= 1 and 1 <= i2 <= i and jk == jq - (i - i2)))
    return out


@pytest.mark.parametrize("drop", [False, True])
def test_layout_and_mask(drop):
    gen = torch.Generator().manual_seed(1) if drop else None
    n, n_p, P = 20, 5, 6
    b, j = pt.pard_layout(n, n_p, P, 0.7, 0.2, gen)
    assert (b[:n] == 0).all() and (j[:n] == torch.arange(n)).all()
    kept = set(zip(b.tolist(), j.tolist()))
    for i, jj in kept:
        if i >= 1:
            assert jj >= i and n_p <= jj + 1 < n                      # an anchor exists, the label is generated
            assert (i - 1, jj - 1) in kept                            # COD: the whole chain is kept
    sizes = [int((b == i).sum()) for i in range(1, P)]
    n_lab = n - n_p
    for i, size in enumerate(sizes, 1):                               # n * max(r^i, r_min), or all candidates
        want = int(n_lab * max(0.7 ** i, 0.2)) if drop else n_lab - (i - 1)
        assert want - 1 <= size <= want
    assert torch.equal(pt.pard_mask(b, j), mask_by_hand(b, j))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_training_logits_equal_inference_logits(attn):
    model = tiny(attn)
    g = torch.Generator().manual_seed(0)
    seqs = [{"ids": torch.randint(0, M, (n,), generator=g).tolist(), "n_prompt": n_p} for n, n_p in [(14, 4), (9, 3)]]
    batch = pt.pard_batch(seqs, 5, M, 0.7, 0.2, torch.Generator().manual_seed(3), pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=pt.attention_mask_for(model, pt.pard_batch_mask(batch["block"], batch["position_ids"]))).logits
    checked = 0
    for r, s in enumerate(seqs):
        for e in range(batch["input_ids"].shape[1]):
            d, jj, lab = int(batch["depth"][r, e]), int(batch["position_ids"][r, e]), int(batch["labels"][r, e])
            if lab < 0:
                continue
            blk = d - 1
            a = jj - blk                                               # the last real token this element sees
            assert lab == s["ids"][a + d]                              # depth d predicts d steps past its anchor
            ids = torch.tensor([s["ids"][:a + 1] + [M] * blk])         # inference: prefix + masks, causal
            with torch.no_grad():
                ref = model(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(logits[r, e], ref, atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked > 20
    loss, depth, pred, _ = pt.pard_forward(model, batch, torch.device("cpu"), amp=False, chunk=7, with_logits=True)
    sel = batch["labels"] >= 0
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[sel], batch["labels"][sel], reduction="none"))
    assert torch.equal(depth, batch["depth"][sel])


def test_build_draft(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    target = LlamaForCausalLM(cfg)
    target.save_pretrained(tmp_path / "t")
    d = pt.build_draft(tmp_path / "t", [0, 3], "sdpa")
    assert d.config.vocab_size == V + 1 and d.config.pard_token == V and d.config.num_hidden_layers == 2
    e = d.model.embed_tokens.weight
    assert e.data_ptr() == d.lm_head.weight.data_ptr()
    torch.testing.assert_close(e[:V], target.model.embed_tokens.weight)
    torch.testing.assert_close(e[V], target.model.embed_tokens.weight.mean(0))
    torch.testing.assert_close(d.model.layers[1].mlp.down_proj.weight, target.model.layers[3].mlp.down_proj.weight)
    d.save_pretrained(tmp_path / "d")
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    assert saved["pard_token"] == V and saved["vocab_size"] == V + 1 and saved["spd_type"] == "pard"


@pytest.mark.parametrize("right_depths,want", [(99, lambda k: k + 1), (0, lambda k: 1), (2, lambda k: min(k, 2) + 1)])
def test_validate_accepted_length(monkeypatch, right_depths, want):
    """Drafts right at depths <= right_depths: every anchor accepts min(K, right_depths) drafts."""
    def fake_forward(model, batch, dev, amp, with_logits=False):
        sel = batch["labels"] >= 0
        y, depth = batch["labels"][sel], batch["depth"][sel]
        return torch.zeros(len(y)), depth, torch.where(depth <= right_depths, y, -1), batch

    class Dummy:
        def eval(self):
            pass

        def train(self):
            pass
    monkeypatch.setattr(pt, "pard_forward", fake_forward)
    seqs = [{"ids": list(range(n)), "n_prompt": p} for n, p in [(30, 5), (22, 9), (12, 4)]]
    args = type("A", (), {"k_train": 5, "pard_token": M, "batch": 2})
    v = pt.validate(Dummy(), seqs, args, torch.device("cpu"), False)
    assert v["mean_accepted_len"] == {k: want(k) for k in range(1, 6)}


def test_shipped_draft_loads_as_the_trained_model(tmp_path):
    """save_draft stores only the trained tensors; pacekern's loader rebuilds the full draft from the
    target's embedding, and the training forward (frozen rows + mask row) equals a plain forward."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from llm.weights import ModelSpec, load
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "t")
    d = pt.build_draft(tmp_path / "t", [0, 2], "eager")
    with torch.no_grad():
        d.pard_mask_row.normal_()                                      # as if trained
    args = type("A", (), {"out": str(tmp_path / "d"), "save_dtype": "float32", "target": str(tmp_path / "t"),
                          "layers": [0, 2], "head_tokens": 0})()
    data = {"prompts": {"train": [], "heldout": [], "heldout_passages": []}}
    pt.save_draft(d, args, tmp_path / "t", data, [])
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    assert saved["pard_token"] == V and saved["pard_embed_from"] == str(tmp_path / "t")
    w = load(tmp_path / "d", ModelSpec.from_dir(tmp_path / "d"), "f32")
    torch.testing.assert_close(w.embed, torch.cat([d.model.embed_tokens.weight[:V], d.pard_mask_row]))
    assert not list((tmp_path / "d").glob("*.partial"))

    plain = LlamaForCausalLM._from_config(d.config, attn_implementation="eager", dtype=torch.float32).eval()
    sd = {k: v for k, v in d.state_dict().items() if k != "pard_mask_row"}
    sd["model.embed_tokens.weight"] = sd["lm_head.weight"] = w.embed
    plain.load_state_dict(sd, strict=False)
    plain.tie_weights()
    seqs = [{"ids": torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(2)).tolist(), "n_prompt": 3}]
    batch = pt.pard_batch(seqs, 4, V, 0.7, 0.2, None)
    with torch.no_grad():
        a = pt.pard_forward(d.eval(), batch, torch.device("cpu"), amp=False, with_logits=True)
        b = pt.pard_forward(plain, batch, torch.device("cpu"), amp=False, with_logits=True)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[2], b[2])
