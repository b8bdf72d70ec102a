"""Train a PARD draft (parallel draft: K proposals from one forward) for SmolLM2-135M-Instruct.

    ./run python experiments/pard_train.py --out runs/pard-smollm2              # data, then training
    ./run python experiments/pard_train.py --out runs/pard-smollm2 --resume     # continue after a stop
    ./run python experiments/pard_train.py --out runs/pard-smollm2 --export     # the draft from the last checkpoint
    ./run python experiments/pard_train.py --out runs/pard-smollm2 --eval       # lossless + acceptance check
    on a GPU: --device cuda, with --gen-minutes / --minutes budgets (the shipped draft's README has the command)
    then: LLMModel(pard_config=PardSpecDecodeConfig("runs/pard-smollm2", num_speculative_tokens=4))

The draft is carved out of the target (there is no smaller SmolLM2): a few of its decoder layers
(--layers, trained), its final norm (trained), and its embedding / tied LM head, kept frozen, plus
ONE new trained row for the mask token (vocab 49153, `pard_token` = 49152, initialised to the mean
embedding). Frozen embeddings make the draft small to ship: OUT/ stores the layers, the norm and
the mask row ("model.embed_tokens.extra"); config.json's `pard_embed_from` names the target whose
embedding pacekern's loader puts in front of that row.

1. Data, by self-distillation: the target (HF transformers) continues prompts greedily: raw windows
   of Botchan / Lee text and chat instructions built from snippets of them. Passages are split into
   train / held-out first, so validation and --eval prompts share no text with training. Token ids
   are cached in OUT/train/selfdistill.json (.partial rename after every batch; a rerun continues).
2. The PARD objective (research notes pard.md §2.2-2.3): sequence x becomes block 0 = x plus P-1
   blocks of mask tokens at the same positions; the mask in block i at position j (anchor a = j-i,
   the last real token it sees) attends to x[0..a] and to the masks of blocks 1..i with the same
   anchor -- the context mask i has at inference -- and predicts x[j+1], i+1 steps past its anchor.
   COD keeps all of block 0 and n * max(r^i, r_min) random masks of block i among the successors of
   block i-1's kept ones, so every kept mask keeps its chain. Cross-entropy on every kept position
   whose target is a generated token (prompts are context only).
3. OUT/ is the shipped draft (config.json with "pard_token": 49152 and "pard_embed_from", one
   safetensors file in --save-dtype) plus pard_train.json (settings, losses, prompts used) and
   README.md; OUT/train/ holds the data cache and the checkpoint (ckpt.pt, for --resume).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

sys.path.append(str(Path(__file__).resolve().parents[1]))   # after an installed pacekern
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHAT = ["Summarize the following text in a few sentences:\n\n{s}", "Continue this story:\n\n{s}",
        "What is the main idea of this passage?\n\n{s}", "Rewrite the following in simple English:\n\n{s}",
        "Write three questions a reader might ask about this text:\n\n{s}", "Give a short title for this text:\n\n{s}",
        "Translate into French:\n\n{s}", "Explain what the word '{w}' means and use it in a sentence.",
        "Write a short poem about {w}.", "List five facts about {w}.", "Tell me a short story about {w}.",
        "Write a Python function that counts how often the word '{w}' appears in a string."]


def atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj):
    atomic_write(path, lambda p: p.write_text(json.dumps(obj)))


# ---- prompts ------------------------------------------------------------------------------------
def passages(words_per=120) -> list:
    """Disjoint pieces of ~words_per words of Botchan and of the Lee articles: (source, text)."""
    from llm.textdata import botchan_text, lee_text
    out = []
    for src, docs in [("botchan", re.split(r"\n\s*\n", botchan_text().replace("\r\n", "\n"))),
                      ("lee", lee_text().splitlines())]:
        words = []
        for doc in docs:
            words += re.sub(r"\s+", " ", doc).split()
            if src == "lee" or len(words) >= words_per:      # a Lee article never runs into the next one
                out += [(src, " ".join(words[k:k + words_per])) for k in range(0, len(words), words_per)
                        if len(words[k:k + words_per]) >= 30]
                words = []
    return out


def make_prompt(rng: random.Random, text: str, tok) -> dict:
    """One prompt from a passage: a raw window (continued as plain text) or a chat instruction."""
    sents = [m.start() for m in re.finditer(r"(?:^|(?<=[.!?\"] ))[A-Z\"]", text)] or [0]
    words = text[rng.choice(sents):].split()
    if rng.random() < 0.4:
        p = " ".join(words[:rng.randint(10, 40)])
        return {"kind": "raw", "text": p, "ids": tok(p, add_special_tokens=True).input_ids}
    long = [w.strip(".,;:!?\"'()") for w in text.split() if len(w.strip(".,;:!?\"'()")) >= 6] or ["water"]
    msg = rng.choice(CHAT).format(s=" ".join(words[:rng.randint(15, 60)]), w=rng.choice(long).lower())
    s = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False)
    return {"kind": "chat", "text": msg, "ids": tok(s, add_special_tokens=False).input_ids}


def build_prompts(args, tok) -> dict:
    """Train / held-out prompts from disjoint passages (held-out: the val set and the --eval prompts)."""
    rng = random.Random(args.seed)
    ps = passages()
    order = list(range(len(ps)))
    rng.shuffle(order)
    held, train = order[:args.heldout_passages], order[args.heldout_passages:]
    mk = lambda k: dict(make_prompt(rng, ps[k][1], tok), passage=k, source=ps[k][0])
    return {"train": [mk(train[n % len(train)]) for n in range(args.gen_samples)],
            "heldout": [mk(held[n % len(held)]) for n in range(args.val_samples + args.eval_prompts)],
            "n_val": args.val_samples, "n_passages": len(ps), "heldout_passages": sorted(held)}


# ---- self-distillation ----------------------------------------------------------------------------
@torch.no_grad()
def self_distill(args, target_dir: Path, tok, path: Path) -> dict:
    """Greedy continuations of every prompt by the target, cached; returns the data dict."""
    data = json.loads(path.read_text()) if path.exists() else None
    if data is None:
        prompts = build_prompts(args, tok)
        data = {"prompts": prompts, "gen_tokens": args.gen_tokens, "seqs": {}, "complete": False}
    if data["complete"]:
        return data
    if args.gen_stop:                                         # train on what is there; the rest is never made
        data.update(complete=True, stopped_at=len(data["seqs"]))
        print(f"self-distillation stopped by --gen-stop at {len(data['seqs'])} sequences")
        write_json(path, data)
        return data
    from transformers import AutoModelForCausalLM
    dev = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.gen_dtype]
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).to(dev).eval()
    todo = [(split, n, p["ids"]) for split in ("heldout", "train") for n, p in enumerate(data["prompts"][split])
            if f"{split}/{n}" not in data["seqs"] and (split == "train" or n < data["prompts"]["n_val"])]
    todo.sort(key=lambda t: (t[0] != "heldout", len(t[2])))  # validation first; similar lengths together
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bar = tqdm(total=len(todo), desc="self-distillation (target greedy)", unit="seq")
    t0, n_tok = time.perf_counter(), 0
    for b in range(0, len(todo), args.gen_batch):
        rows = todo[b:b + args.gen_batch]
        width = max(len(r[2]) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r[2])) + r[2] for r in rows], device=dev)   # left padding
        att = torch.tensor([[0] * (width - len(r[2])) + [1] * len(r[2]) for r in rows], device=dev)
        out = target.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.gen_tokens, do_sample=False,
                              pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
        for (split, n, prompt), gen in zip(rows, out):
            gen = gen[:gen.index(eos) + 1] if eos in gen else gen      # keep EOS: the draft learns endings
            data["seqs"][f"{split}/{n}"] = {"ids": prompt + gen, "n_prompt": len(prompt)}
            n_tok += len(gen)
        write_json(path, data)
        bar.update(len(rows))
        bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
        if args.gen_minutes and time.perf_counter() - t0 > 60 * args.gen_minutes:
            data["stopped_at"] = len(data["seqs"])               # the time budget: train on what is there
            tqdm.write(f"self-distillation stopped by --gen-minutes after {len(data['seqs'])} sequences")
            break
    bar.close()
    data["complete"] = True
    write_json(path, data)
    return data


# ---- the draft ------------------------------------------------------------------------------------
def build_draft(target_dir: Path, layers: list, attn: str):
    """LlamaForCausalLM with the target's embedding (+1 mask row), the chosen layers, norm, tied head."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig.from_pretrained(str(target_dir))
    v = cfg.vocab_size
    assert all(0 <= i < cfg.num_hidden_layers for i in layers), f"layers {layers} outside 0..{cfg.num_hidden_layers - 1}"
    cfg.num_hidden_layers, cfg.vocab_size, cfg.tie_word_embeddings = len(layers), v + 1, True
    cfg.pard_token, cfg.spd_type, cfg.pard_source_layers = v, "pard", list(layers)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    sd = {}
    with safe_open(str(next(target_dir.glob("*.safetensors"))), framework="pt") as st:
        emb = st.get_tensor("model.embed_tokens.weight").float()
        sd["model.embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True)])
        sd["model.norm.weight"] = st.get_tensor("model.norm.weight").float()
        for new, old in enumerate(layers):
            for k in st.keys():
                if k.startswith(f"model.layers.{old}."):
                    sd[k.replace(f"layers.{old}.", f"layers.{new}.", 1)] = st.get_tensor(k).float()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.model.embed_tokens.weight.requires_grad_(False)             # frozen: the target's rows
    model.pard_mask_row = torch.nn.Parameter(emb.mean(0, keepdim=True))   # trained: the mask token's row
    return model





# ---- the PARD multi-block batch ---------------------------------------------------------------------
def pard_layout(n: int, n_prompt: int, P: int, r: float, r_min: float, gen: torch.Generator | None):
    """Kept elements of one n-token sequence: (block, position) tensors. Block 0 = all real tokens;
    block i keeps masks only where the predicted token x[j+1] is a generated one, chosen among the
    successors j = p+1 of block i-1's kept p (COD); gen=None keeps all (no drop)."""
    blocks, pos = [torch.zeros(n, dtype=torch.long)], [torch.arange(n)]
    n_lab = max(n - max(n_prompt, 1), 0)                         # positions n_prompt-1 .. n-2 have a label
    prev = pos[0]
    for i in range(1, P):
        cand = prev + 1
        cand = cand[(cand + 1 < n) & (cand + 1 >= n_prompt)]
        if gen is not None:
            k = min(len(cand), int(n_lab * max(r ** i, r_min)))
            cand = cand[torch.randperm(len(cand), generator=gen)[:k]].sort().values
        if len(cand) == 0:
            break
        blocks.append(torch.full_like(cand, i))
        pos.append(cand)
        prev = cand
    return torch.cat(blocks), torch.cat(pos)


def pard_batch_mask(b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool from block / position ids [B, L], True = query may attend key; built on
    whatever device b and j live on. Anchor a = j - b. A real token sees real tokens at positions
    <= its own; a mask sees real tokens at positions <= its anchor and the masks of blocks <= its own
    with the same anchor (itself included). Padding (block -1) sees only itself and is never seen."""
    a = j - b
    bq, bk, aq, ak = b[:, :, None], b[:, None, :], a[:, :, None], a[:, None, :]
    real_k = (bk == 0) & (j[:, None, :] <= aq)
    chain = (bk >= 1) & (bk <= bq) & (ak == aq)
    eye = torch.eye(b.shape[1], dtype=torch.bool, device=b.device)
    return torch.where(bq < 0, eye, real_k | chain)[:, None]


def pard_mask(b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """[L, L] mask of one unpadded sequence (see pard_batch_mask)."""
    return pard_batch_mask(b[None], j[None])[0, 0]


def pard_batch(seqs: list, P: int, mask_id: int, r: float, r_min: float, gen=None, pad_id: int = 0) -> dict:
    """input_ids / position_ids / labels / depth / block [B, L] (block -1 = padding); the attention
    mask is pard_batch_mask(block, position_ids), made on the training device."""
    items = []
    for s in seqs:
        x, n_p = torch.tensor(s["ids"]), s["n_prompt"]
        b, j = pard_layout(len(x), n_p, P, r, r_min, gen)
        nxt = j + 1
        ok = (nxt < len(x)) & (nxt >= n_p)
        lab = torch.where(ok, x[nxt.clamp(max=len(x) - 1)], -100)
        items.append((torch.where(b == 0, x[j], mask_id), j, lab, torch.where(ok, b + 1, 0), b))
    L = max(len(it[0]) for it in items)
    out = {"input_ids": torch.full((len(items), L), pad_id), "position_ids": torch.zeros(len(items), L, dtype=torch.long),
           "labels": torch.full((len(items), L), -100), "depth": torch.zeros(len(items), L, dtype=torch.long),
           "block": torch.full((len(items), L), -1)}
    for n, (ids, j, lab, dep, b) in enumerate(items):
        k = len(ids)
        out["input_ids"][n, :k], out["position_ids"][n, :k], out["labels"][n, :k], out["depth"][n, :k] = ids, j, lab, dep
        out["block"][n, :k] = b
    return out


def attention_mask_for(model, allow: torch.Tensor) -> torch.Tensor:
    """sdpa takes the bool mask; eager adds a float mask (0 allowed, -inf-ish blocked)."""
    if model.config._attn_implementation == "sdpa":
        return allow
    return torch.zeros(allow.shape, device=allow.device).masked_fill(~allow, torch.finfo(torch.float32).min)


def pard_forward(model, batch: dict, dev, amp: bool, chunk: int = 2048, with_logits: bool = False):
    """Per-token CE (and argmax) at the labelled positions; the LM head runs on those rows only,
    in chunks that are recomputed in backward, so the [tokens, 49153] logits never all live at once."""
    bt = {k: v.to(dev) for k, v in batch.items()}
    row = getattr(model, "pard_mask_row", None)
    w = model.model.embed_tokens.weight
    if row is None:                                     # a plain model: embedding and head as they are
        x, linear = F.embedding(bt["input_ids"], w), lambda hh: F.linear(hh, w)
    else:                                               # frozen rows + the trained mask row, for both
        mask_id = w.shape[0] - 1
        x = torch.where((bt["input_ids"] == mask_id)[..., None], row, F.embedding(bt["input_ids"], w))
        linear = lambda hh: torch.cat([F.linear(hh, w[:-1]), F.linear(hh, row)], -1)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        h = model.model(inputs_embeds=x, position_ids=bt["position_ids"],
                        attention_mask=attention_mask_for(model, pard_batch_mask(bt["block"], bt["position_ids"])),
                        use_cache=False).last_hidden_state
        sel = bt["labels"] >= 0
        h, y, depth = h[sel], bt["labels"][sel], bt["depth"][sel]
        head = lambda hh, yy: F.cross_entropy(linear(hh).float(), yy, reduction="none")
        losses, preds = [], []
        for s in range(0, len(y), chunk):
            hh, yy = h[s:s + chunk], y[s:s + chunk]
            if with_logits:
                logits = linear(hh).float()
                losses.append(F.cross_entropy(logits, yy, reduction="none"))
                preds.append(logits.argmax(-1))
            else:
                losses.append(checkpoint(head, hh, yy, use_reentrant=False))
    return torch.cat(losses), depth, (torch.cat(preds) if with_logits else None), bt


@torch.no_grad()
def validate(model, seqs, args, dev, amp) -> dict:
    """Teacher-forced on held-out greedy data, nothing dropped: loss per depth, and the mean accepted
    length per round for K = 1..P averaged over anchors (positions) in the generated part."""
    model.eval()
    P = args.k_train
    tot, cnt, al_sum, al_n = torch.zeros(P + 1), torch.zeros(P + 1), torch.zeros(P), 0
    for b in range(0, len(seqs), args.batch):
        part = seqs[b:b + args.batch]
        batch = pard_batch(part, P, args.pard_token, 1.0, 1.0, None)
        loss, depth, pred, bt = pard_forward(model, batch, dev, amp, with_logits=True)
        ok, depth, loss = (pred == bt["labels"][bt["labels"] >= 0]).cpu(), depth.cpu(), loss.float().cpu()
        tot.index_add_(0, depth, loss)
        cnt.index_add_(0, depth, torch.ones_like(loss))
        # right[n, d, a]: the depth-d draft from anchor a is right (it sits in block d-1 at position a+d-1)
        sel = batch["labels"] >= 0
        right = torch.zeros(len(part), P + 1, batch["input_ids"].shape[1], dtype=torch.long)
        right[torch.arange(len(part))[:, None].expand_as(sel)[sel], depth, batch["position_ids"][sel] - depth + 1] = ok.long()
        for n, s in enumerate(part):
            run = right[n, 1:, s["n_prompt"]:len(s["ids"]) - P].cumprod(0)   # [P, anchors]: leading drafts right
            al_sum += (1 + run.cumsum(0)).sum(1)
            al_n += run.shape[1]
    model.train()
    return {"loss": round(float(tot[1:].sum() / cnt[1:].sum()), 4),
            "loss_by_depth": [round(float(t / max(c, 1)), 3) for t, c in zip(tot[1:], cnt[1:])],
            "mean_accepted_len": {k: round(float(al_sum[k - 1] / max(al_n, 1)), 3) for k in range(1, P + 1)}}


# ---- training ---------------------------------------------------------------------------------------
def train(args):
    from transformers import AutoTokenizer
    from llm.models import resolve
    out, work = Path(args.out), Path(args.out) / "train"
    work.mkdir(parents=True, exist_ok=True)
    target_dir = resolve(args.target)
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    data = self_distill(args, target_dir, tok, work / "selfdistill.json")
    seqs = {k: dict(v, ids=v["ids"][:args.seq_len]) for k, v in data["seqs"].items()}
    train_seqs = [s for k, s in seqs.items() if k.startswith("train/") and len(s["ids"]) > s["n_prompt"] + 1]
    val_seqs = [seqs[k] for n in range(data["prompts"]["n_val"]) if (k := f"heldout/{n}") in seqs]
    if not train_seqs or not val_seqs:
        raise SystemExit(f"self-distillation made {len(train_seqs)} training and {len(val_seqs)} validation sequences: "
                         f"need both (a longer --gen-minutes, or a larger --gen-batch)")
    print(f"data: {len(train_seqs)} train sequences, {sum(len(s['ids']) - s['n_prompt'] for s in train_seqs)} "
          f"generated tokens; {len(val_seqs)} held-out for validation")

    dev = torch.device(args.device)
    amp = args.amp == "bf16"
    model = build_draft(target_dir, args.layers, args.attn).to(dev)
    args.pard_token = model.config.pard_token
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = min(args.warmup, args.steps // 10 + 1)

    def progress() -> float:
        """Fraction of the run done: by steps, or by time under --minutes (whichever is further)."""
        by_time = (elapsed + time.perf_counter() - t_start) / (60 * args.minutes) if args.minutes else 0.0
        return min(1.0, max(step / max(args.steps, 1), by_time))

    def set_lr():                                             # warm-up, then cosine to lr/10
        f = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress())))
        for g in opt.param_groups:
            g["lr"] = args.lr * f
    gen, rng = torch.Generator().manual_seed(args.seed), random.Random(args.seed)
    step, history, order, elapsed = 0, [], [], 0.0
    ckpt = work / "ckpt.pt"
    if args.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False, map_location="cpu")
        if st["layers"] != args.layers:
            raise SystemExit(f"{ckpt} was trained with --layers {st['layers']}, not {args.layers}")
        model.load_state_dict(st["model"]), opt.load_state_dict(st["opt"])
        step, history, order, elapsed = st["step"], st["history"], st["order"], st.get("elapsed", 0.0)
        gen.set_state(st["gen"]), rng.setstate(st["rng"])
        print(f"resumed from {ckpt} at step {step}")

    def save_ckpt():
        state = dict(model=model.state_dict(), opt=opt.state_dict(), step=step, elapsed=elapsed + time.perf_counter() - t_start,
                     history=history, order=order, gen=gen.get_state(), rng=rng.getstate(), layers=args.layers)
        atomic_write(ckpt, lambda p: torch.save(state, p))

    t_start = time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc="PARD training", unit="step")
    while progress() < 1.0:
        t0 = time.perf_counter()
        set_lr()
        if len(order) < args.batch:                          # a fresh epoch
            order += rng.sample(range(len(train_seqs)), len(train_seqs))
        part, order = [train_seqs[i] for i in order[:args.batch]], order[args.batch:]
        batch = pard_batch(part, args.k_train, args.pard_token, args.cod_r, args.cod_rmin, gen)
        loss_tok, depth, _, _ = pard_forward(model, batch, dev, amp)
        loss = loss_tok.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        d = depth.cpu()
        by_depth = torch.zeros(args.k_train + 1).index_add_(0, d, loss_tok.detach().float().cpu()) / \
            torch.bincount(d, minlength=args.k_train + 1).clamp(min=1)
        history.append({"step": step, "loss": round(loss.item(), 4), "d1": round(float(by_depth[1]), 3),
                        "d4": round(float(by_depth[min(4, args.k_train)]), 3), "gnorm": round(float(gnorm), 3),
                        "tokens": int(batch["input_ids"].numel()), "s": round(time.perf_counter() - t0, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", d1=f"{by_depth[1]:.2f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        done = progress() >= 1.0
        if step % args.val_every == 0 or done:
            v = validate(model, val_seqs, args, dev, amp)
            history[-1]["val"] = v
            tqdm.write(f"step {step}: val loss {v['loss']:.3f} by depth {v['loss_by_depth']} "
                       f"mean accepted len {v['mean_accepted_len']}")
        if step % args.save_every == 0 or done:
            save_ckpt()
    bar.close()
    save_draft(model, args, target_dir, data, history)


def head_tokens(data: dict, n: int, vocab: int) -> torch.Tensor:
    """The n tokens the shipped draft may propose: the most frequent in the target's training
    continuations, then in the training prompts. A draft argmax over them instead of all 49152
    reads a sixth of the head's bytes; a token outside them is simply never proposed (the target's
    verification keeps the output exact)."""
    from collections import Counter
    gen, ctx = Counter(), Counter()
    for key, s in data["seqs"].items():
        if key.startswith("train/"):
            gen.update(s["ids"][s["n_prompt"]:])
            ctx.update(s["ids"][:s["n_prompt"]])
    score = Counter({t: 1000 * c for t, c in gen.items()})
    score.update(ctx)
    ids = sorted(t for t, _ in score.most_common(n) if t < vocab)
    return torch.tensor(ids, dtype=torch.int64)


def save_draft(model, args, target_dir: Path, data: dict, history: list):
    """OUT/: config.json + model.safetensors with the trained tensors only (layers, norm, mask row)."""
    from safetensors.torch import save_file
    out = Path(args.out)
    tmp = out / ".final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.save_dtype]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
               if k.startswith(("model.layers.", "model.norm."))}
    tensors["model.embed_tokens.extra"] = model.pard_mask_row.detach().to("cpu", dtype).contiguous()
    if args.head_tokens:
        tensors["lm_head.ids"] = head_tokens(data, args.head_tokens, model.config.pard_token)
    save_file(tensors, str(tmp / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.update(architectures=["LlamaForCausalLM"], dtype=args.save_dtype, pard_embed_from=args.target or "smollm2-135m-instruct")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    settings = {k: v for k, v in vars(args).items() if k not in ("eval",)}
    thin = max(1, len(history) // 100)
    meta = {"target": str(target_dir), "settings": settings, "history": [h for n, h in enumerate(history)
                                                                         if n % thin == 0 or "val" in h],
            "final_val": next((h["val"] for h in reversed(history) if "val" in h), None),
            # every prompt made, used or not; the training prompts without their text (rebuilt from --seed)
            "prompts": {split: [{k: p[k] for k in ("kind", "source", "passage", "text") if split == "heldout" or k != "text"}
                                for p in data["prompts"][split]] for split in ("train", "heldout")},
            "train_sequences": sum(k.startswith("train/") for k in data.get("seqs", {})),
            "heldout_passages": data["prompts"]["heldout_passages"]}
    write_json(tmp / "pard_train.json", meta)
    (tmp / "README.md").write_text(
        f"# PARD draft for {target_dir}\n\nMade by experiments/pard_train.py: target layers {args.layers} and final norm, "
        f"trained; the embedding and tied head are the target's, frozen and not stored here (config `pard_embed_from`); "
        f"mask token {model.config.pard_token} is the added row `model.embed_tokens.extra`. Settings, validation and the training / "
        f"held-out prompts: pard_train.json.\nFinal validation: {meta['final_val']}\n\nUse: "
        f"`LLMModel(pard_config=PardSpecDecodeConfig('{out}', num_speculative_tokens=4))`\n")
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):   # config.json last: marks completion
        os.replace(f, out / f.name)
    tmp.rmdir()
    print(f"saved the draft to {out} (eval: ./run python {sys.argv[0]} --out {out} --eval)")


def export(args):
    """Write the draft from the last checkpoint (OUT/train/ckpt.pt), e.g. while training goes on."""
    from llm.models import resolve
    out = Path(args.out)
    target_dir = resolve(args.target)
    data = json.loads((out / "train" / "selfdistill.json").read_text())
    st = torch.load(out / "train" / "ckpt.pt", weights_only=False, map_location="cpu")
    args.layers = st["layers"]
    model = build_draft(target_dir, args.layers, args.attn)
    model.load_state_dict(st["model"])
    print(f"exporting step {st['step']}")
    save_draft(model, args, target_dir, data, st["history"])


# ---- evaluation with pacekern ------------------------------------------------------------------------
def evaluate(args):
    from pacekern.llm import LLMModel, PardSpecDecodeConfig, SamplingConfig
    from llm.speculative import heldout_prompts
    out = Path(args.out)
    prompts = heldout_prompts(out, args.eval_prompts)          # held-out passages, not the validation sequences
    cfg = SamplingConfig(max_new_tokens=args.eval_tokens)
    for k in args.eval_k:
        m = LLMModel(dtype="float32", pard_config=PardSpecDecodeConfig(str(out), num_speculative_tokens=k))
        drafter, mask = m.drafter, m.drafter.mask
        propose = drafter.propose

        def checked(i, kk):
            d = propose(i, kk)
            assert mask not in d, "the draft proposed its mask token (outside the target's vocabulary)"
            return d
        drafter.propose = checked
        n_more = rounds = acc = drafted = 0
        t_spec = t_ref = 0.0
        for p in prompts:
            m.set_drafter(drafter, k)
            t = time.perf_counter()
            s = m.generate(p, cfg)
            t_spec += time.perf_counter() - t
            m.set_drafter(None, 0)
            t = time.perf_counter()
            ref = m.generate(p, cfg)
            t_ref += time.perf_counter() - t
            if s.token_ids != ref.token_ids:
                first = next(i for i, (a, b) in enumerate(zip(s.token_ids + [-1], ref.token_ids + [-1])) if a != b)
                raise AssertionError(f"PARD output differs from plain greedy at token {first} for {str(p)[:60]!r}")
            mt = s.metrics
            if not mt.rounds:
                continue
            print(f"K={k} {'chat' if isinstance(p, list) else 'raw':4s} {mt.new_tokens:3d} tok, {mt.rounds:2d} rounds: mean_accepted_per_round "
                  f"{mt.mean_accepted_per_round:.2f}, acceptance_rate {mt.acceptance_rate:.2f} | {str(p)[:50]!r}")
            n_more, rounds = n_more + mt.new_tokens - 1, rounds + mt.rounds      # tokens after the first
            acc, drafted = acc + mt.acceptance_rate * mt.rounds * k, drafted + mt.rounds * k
        print(f"K={k}: {len(prompts)} held-out prompts, output == plain greedy for all; "
              f"metrics.mean_accepted_per_round {n_more / max(rounds, 1):.3f}, "
              f"acceptance_rate {acc / max(drafted, 1):.3f}; wall {t_spec:.1f} s PARD vs {t_ref:.1f} s plain")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory: the HF draft, plus train/ (data cache, checkpoint)")
    ap.add_argument("--target", default=None, help="target model (default: pacekern's smollm2-135m-instruct)")
    ap.add_argument("--layers", default="0,1,2,29", type=lambda s: [int(x) for x in s.split(",")],
                    help="target layers copied into the draft, in order")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--minutes", type=float, default=None, help="train for this long (the schedule follows time; --steps still caps the run)")
    ap.add_argument("--seq-len", type=int, default=256, help="prompt + generated tokens, truncated to this")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4, help="peak; warm-up, then cosine to lr/10")
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--k-train", type=int, default=8, help="P: 1 real block + P-1 mask blocks")
    ap.add_argument("--cod-r", type=float, default=0.7)
    ap.add_argument("--cod-rmin", type=float, default=0.2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--amp", default="bf16", choices=["bf16", "none"], help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/train/ckpt.pt")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--head-tokens", type=int, default=8192, help="tokens the shipped draft may propose (0: all)")
    ap.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-samples", type=int, default=2000, help="training prompts the target continues")
    ap.add_argument("--gen-tokens", type=int, default=192, help="max new tokens per continuation")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--gen-dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--gen-minutes", type=float, default=None, help="stop self-distillation after this long")
    ap.add_argument("--gen-stop", action="store_true", help="stop self-distillation: train on the sequences made so far")
    ap.add_argument("--heldout-passages", type=int, default=40)
    ap.add_argument("--val-samples", type=int, default=16, help="held-out sequences for validation")
    ap.add_argument("--eval", action="store_true", help="check the saved draft with pacekern's LLMModel")
    ap.add_argument("--export", action="store_true", help="write the draft from the last checkpoint")
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=64)
    ap.add_argument("--eval-k", default="4", type=lambda s: [int(x) for x in s.split(",")])
    args = ap.parse_args(argv)
    args.gen_dtype = args.gen_dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    evaluate(args) if args.eval else export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
