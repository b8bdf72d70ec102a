"""Speculative decoding is lossless: its output equals plain greedy decoding token for token, for
every rollback length (oracle drafts right for exactly j tokens), for random drafts, for a real
model drafter and for the PARD drafter, at batch 1 and batch > 1, with chains and with trees."""
import random

import pytest
import torch

from llm.speculative import ModelDrafter, PardDrafter, PardSpecDecodeConfig
from pacekern.llm import LLMModel, SamplingConfig

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little girl named",
           "import numpy as np\n\n# compute the mean of each row\n", "Water boils at", "In 1969, the first humans",
           "The three primary colors are", "My favourite recipe for pancakes:", "Dear Sir or Madam,",
           "for (int i = 0; i < n; i++) {", "The mitochondria is", "Q: What is 12 times 7?\nA:",
           "Roses are red,", "SELECT name FROM users WHERE", "The quick brown fox", "It was a dark and stormy night"]


class OracleDrafter:
    """Proposes the true greedy continuation, made wrong after `right` tokens of each round
    (None: always right), or random tokens (right=-1)."""

    def __init__(self, truth, right, vocab, seed=0):
        self.truth, self.right, self.vocab, self.rng = truth, right, vocab, random.Random(seed)
        self.n = {}

    def begin(self, n_rows, max_tokens, k):
        pass

    def release(self, n_rows):
        pass

    def prefill(self, i, prompt, first):
        self.n[i] = 1

    def propose(self, i, k):
        if self.right == -1:
            return [self.rng.randrange(self.vocab) for _ in range(k)]
        t = self.truth[i][self.n[i]:self.n[i] + k]
        t = t + [0] * (k - len(t))
        j = self.right if self.right is not None else k
        return [x if q < j else (x + 1) % self.vocab for q, x in enumerate(t)]

    def update(self, i, accepted, new):
        self.n[i] += len(new)


class OracleTreeDrafter(OracleDrafter):
    """Four candidates per depth; the true token sits at rank (round + depth) % 4 (rank 3: left
    out, a wrong tree), so accepted paths run through side branches."""

    def propose_tree(self, i, k):
        t = self.truth[i][self.n[i]:self.n[i] + k]
        t = t + [0] * (k - len(t))
        self.round = getattr(self, "round", 0) + 1
        cands = []
        for d, x in enumerate(t):
            wrong = [(x + 1 + j) % self.vocab for j in range(4)]
            r = (self.round + d) % 4
            cands.append(wrong[:r] + [x] + wrong[r + 1:] if r < 3 else wrong)
        return cands, [[0.5, 0.3, 0.15, 0.05]] * k


@pytest.fixture(scope="module")
def model():
    return LLMModel(dtype="float32")


def greedy(model, prompts, n):
    model.set_drafter(None, 0)
    return [o.token_ids for o in model.generate(prompts, SamplingConfig(max_new_tokens=n))]


@pytest.mark.parametrize("k", [1, 4])
def test_oracle_every_rollback_length(model, k):
    prompts, n = PROMPTS[:2], 24
    truth = greedy(model, prompts, n)
    for right in [None, -1, *range(k)]:
        model.set_drafter(OracleDrafter(truth, right, model.spec.vocab), k)
        outs = model.generate(prompts, SamplingConfig(max_new_tokens=n))
        assert [o.token_ids for o in outs] == truth, f"k={k} right={right}"
        m = outs[0].metrics
        if right is None:                       # all drafts accepted: K + 1 tokens per round
            assert m.acceptance_rate >= 0.9 and m.mean_accepted_per_round >= 0.75 * (k + 1)  # last round: max_new_tokens
        elif right >= 0:
            assert m.acceptance_rate == pytest.approx(right / k, abs=0.15)
    model.set_drafter(None, 0)


def test_model_drafter_and_pard_drafter(model):
    prompts, n = PROMPTS[2:4], 20
    truth = greedy(model, prompts, n)
    draft = LLMModel(dtype="float32")
    model.set_drafter(ModelDrafter(draft), 3)            # the target drafting for itself: always right
    outs = model.generate(prompts, SamplingConfig(max_new_tokens=n))
    assert [o.token_ids for o in outs] == truth
    assert outs[0].metrics.acceptance_rate > 0.9
    model.set_drafter(PardDrafter(draft, mask_id=0), 4)  # an untrained "PARD draft": still lossless
    assert [o.token_ids for o in model.generate(prompts, SamplingConfig(max_new_tokens=n))] == truth
    # the draft caches hold only committed tokens between requests
    assert all(not u for u in draft.cache.in_use)
    model.set_drafter(None, 0)


@pytest.mark.parametrize("ops", ["pacekern", "torch"])
def test_tree_oracle_side_branches(model, ops):
    """Tree verification: positions by depth, attention to ancestors only, the accepted side
    branch's KV rows moved into place; batch 2 equals batch 1 equals plain greedy."""
    from llm.ops import OpConfig
    prompts, n = PROMPTS[4:6], 24
    truth = greedy(model, prompts, n)
    moves, move = [], model.cache.move
    model.cache.move = lambda slot, src, dst: moves.append(src) or move(slot, src, dst)
    model.model.set_opconfig(OpConfig().with_(rope_qkv=ops, attention=ops))
    try:
        for nodes in (3, 8):
            model.set_drafter(OracleTreeDrafter(truth, None, model.spec.vocab), 4, tree_nodes=nodes)
            outs = model.generate(prompts, SamplingConfig(max_new_tokens=n))
            assert [o.token_ids for o in outs] == truth, f"tree_nodes={nodes}"
            assert outs[0].metrics.mean_accepted_per_round > 1.0
            model.set_drafter(OracleTreeDrafter(truth[1:], None, model.spec.vocab), 4, tree_nodes=nodes)
            assert model.generate(prompts[1], SamplingConfig(max_new_tokens=n)).token_ids == truth[1]
        assert moves, "no accepted path ran through a side branch"
    finally:
        model.cache.move = move
        model.model.set_opconfig(OpConfig())
        model.set_drafter(None, 0)


def test_prompt_lookup_and_graft():
    from llm.speculative import PromptLookup, graft
    lk = PromptLookup([5, 6, 7, 8, 9, 5, 6, 7])
    assert lk.propose(3) == [8, 9, 5]                     # after the earlier "5 6 7"
    lk.extend([1, 6, 7])
    assert lk.propose(2) == [1, 6]                        # no earlier "1 6 7": the latest earlier "6 7"
    assert PromptLookup([1, 2, 3]).propose(4) == []
    tree = ([5, 6, 7], [0, 0, 1], [1, 1, 2])              # 5 -> 7 and 6 under the root
    assert graft(tree, [5, 7, 9]) == ([5, 6, 7, 9], [0, 0, 1, 3], [1, 1, 2, 3])   # follows 5 -> 7, adds 9
    assert graft(tree, [8]) == ([5, 6, 7, 8], [0, 0, 1, 0], [1, 1, 2, 1])


def test_tree_needs_a_drafter_that_scores_candidates(model):
    with pytest.raises(ValueError, match="propose_tree"):
        model.set_drafter(ModelDrafter(model), 4, tree_nodes=4)
    with pytest.raises(ValueError, match="tree_nodes=40"):
        model.set_drafter(OracleTreeDrafter({}, None, model.spec.vocab), 4, tree_nodes=40)
    with pytest.raises(ValueError, match="lookup_tokens=4"):
        model.set_drafter(OracleTreeDrafter({}, None, model.spec.vocab), 4, lookup_tokens=4)
    model.set_drafter(None, 0)


def test_sampling_with_drafter_is_an_error(model):
    model.set_drafter(OracleDrafter({}, None, model.spec.vocab), 2)
    with pytest.raises(ValueError, match="greedy only"):
        model.generate(PROMPTS[0], SamplingConfig(do_sample=True, max_new_tokens=4))
    model.set_drafter(None, 0)


def test_pard_token_missing_is_an_error(model):
    with pytest.raises(ValueError, match="pard_token"):
        LLMModel(dtype="float32", pard_config=PardSpecDecodeConfig(str(model.path)))


def test_eos_inside_accepted_block(model):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    model.set_drafter(None, 0)
    ref = model.generate(chat, SamplingConfig(max_new_tokens=40))
    assert ref.finish_reason == "eos"
    truth = [ref.token_ids + [0] * 16]
    model.set_drafter(OracleDrafter(truth, None, model.spec.vocab), 8)
    out = model.generate(chat, SamplingConfig(max_new_tokens=40))
    assert out.token_ids == ref.token_ids and out.finish_reason == "eos"
    model.set_drafter(None, 0)


@pytest.mark.heavy
@pytest.mark.parametrize("k", [1, 4, 8, 12])
def test_lossless_16_prompts_128_tokens(model, k):
    n = 128
    truth = greedy(model, PROMPTS, n)
    for right in [None, -1, k // 2]:
        model.set_drafter(OracleDrafter(truth, right, model.spec.vocab), k)
        assert [o.token_ids for o in model.generate(PROMPTS, SamplingConfig(max_new_tokens=n))] == truth
    # batch 1 equals batch 16
    model.set_drafter(OracleDrafter(truth[3:4], k // 2, model.spec.vocab), k)
    assert model.generate(PROMPTS[3], SamplingConfig(max_new_tokens=n)).token_ids == truth[3]
    model.set_drafter(None, 0)


def test_cli_pard_without_pard_token(model, capsys):
    from pacekern.cli import main
    with pytest.raises(SystemExit, match="pard_token"):
        main(["generate", "hi", "--dtype", "float32", "--pard", str(model.path), "--max-new-tokens", "2"])


# ---------------------------------------------------------------------------------------------
# the PARD draft we ship (experiments/pard_train.py): layers + mask row, sharing the target's
# embedding, proposing only the tokens of its reduced head

SHIPPED = "smollm2-135m-instruct-pard"


def heldout(n):
    from llm.speculative import heldout_prompts
    return heldout_prompts(SHIPPED, n)


@pytest.fixture(scope="module")
def shipped(model):
    m = LLMModel(dtype="float32", pard_config=PardSpecDecodeConfig(SHIPPED, num_speculative_tokens=4))
    return m, m.drafter


def test_shipped_draft_is_lossless_and_drafts_from_its_head(shipped):
    m, drafter = shipped
    ids = set(drafter.llm.weights.head_ids.tolist())
    assert 0 < len(ids) < m.spec.vocab and drafter.mask not in ids
    seen = []
    propose = drafter.propose
    drafter.propose = lambda i, k: seen.append(propose(i, k)) or seen[-1]
    try:
        prompts = heldout(2)
        m.set_drafter(drafter, 4)
        outs = m.generate(prompts, SamplingConfig(max_new_tokens=32))
        assert [o.token_ids for o in outs] == greedy(m, prompts, 32)
        assert seen and all(t in ids for d in seen for t in d)
        assert all(o.metrics.mean_accepted_per_round > 1.0 for o in outs)       # it does get drafts accepted
    finally:
        drafter.propose = propose


def test_shipped_draft_tree_is_lossless(shipped):
    """Trees, with and without a prompt-lookup branch, at batch 2 (rows of different tree sizes)."""
    from llm.speculative import build_tree
    m, drafter = shipped
    prompts = heldout(3)[1:]
    truth = greedy(m, prompts, 48)
    for nodes, lookup in ((8, 0), (4, 8)):
        m.set_drafter(drafter, 4, tree_nodes=nodes, lookup_tokens=lookup)
        outs = m.generate(prompts, SamplingConfig(max_new_tokens=48))
        assert [o.token_ids for o in outs] == truth, (nodes, lookup)
        assert all(o.metrics.mean_accepted_per_round > 1.0 for o in outs)
    tokens, parents, depths = build_tree([[5, 6], [7, 8]], [[0.6, 0.2], [0.5, 0.4]], 3)
    assert (tokens, parents, depths) == ([5, 7, 8], [0, 1, 1], [1, 2, 2])       # 0.6, 0.3, 0.24; not 6 (0.2)
    m.set_drafter(drafter, 4)


def test_int8_weights_pard_is_lossless():
    """int8 weights: verification runs K + 1 rows (or a tree's) through gemm_s8x16 where decode ran
    one, and the draft runs 1 .. 2K rows: every row's logits must be the same bits as at one row
    (strict_fp), or a near tie would flip a token."""
    m = LLMModel(dtype="float32", weights="int8", pard_config=PardSpecDecodeConfig(SHIPPED, num_speculative_tokens=4))
    drafter = m.drafter                                       # greedy() turns drafting off
    prompts = heldout(2) + PROMPTS[:2]
    truth = greedy(m, prompts, 48)
    for k, nodes, lookup in ((2, 0, 0), (4, 0, 0), (4, 6, 8)):
        m.set_drafter(drafter, k, nodes, lookup)
        outs = [m.generate(p, SamplingConfig(max_new_tokens=48)) for p in prompts]
        assert [o.token_ids for o in outs] == truth, (k, nodes, lookup)
        assert all(o.metrics.rounds for o in outs)            # it did draft


def test_reduced_head_draft_cannot_generate_on_its_own(shipped):
    _, drafter = shipped
    with pytest.raises(ValueError, match="drafter"):
        drafter.llm.generate("Hello", SamplingConfig(max_new_tokens=2))


@pytest.mark.heavy
def test_shipped_draft_acceptance_on_unseen_prompts(shipped):
    """Tokens committed per round at K=4 on the 16 held-out prompts of the shipped draft (passages
    split off before any training text was made), lossless: the issue's bar is 2.0 (measured 2.18,
    fp32, on the AMD host of 2026-11-30)."""
    m, drafter = shipped
    prompts = heldout(16)
    truth = greedy(m, prompts, 128)
    m.set_drafter(drafter, 4)
    outs = [m.generate(p, SamplingConfig(max_new_tokens=128)) for p in prompts]
    assert [o.token_ids for o in outs] == truth
    rounds = sum(o.metrics.rounds for o in outs)
    per_round = sum(o.metrics.mean_accepted_per_round * o.metrics.rounds for o in outs) / rounds
    print(f"shipped PARD draft, K=4, 16 held-out prompts: {per_round:.2f} tokens per round")
    assert per_round >= 2.0
    m.set_drafter(drafter, 4, tree_nodes=6, lookup_tokens=8)      # the CLI's default: lossless too
    outs = [m.generate(p, SamplingConfig(max_new_tokens=128)) for p in prompts]
    assert [o.token_ids for o in outs] == truth
    m.set_drafter(drafter, 4)
