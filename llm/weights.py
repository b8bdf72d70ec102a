"""Model description and weights: a Hugging Face directory -> ModelSpec + Weights, laid out for the
kernels (fused QKV and gate/up projections, each linear layer in one storage format).

Formats of a linear layer's weight (`weights=` / `dtype=` of LLMModel):
  f32   fp32 [N, K]                      (dtype="float32")
  bf16  bf16 [N, K]                      (dtype="bfloat16", the default)
  int8  int8 [N, K] + f32 scale per output channel, symmetric (weights="int8"; weight-only:
        activations stay fp32 and are quantized to 16-bit fixed point per row for the GEMV, and for
        the prefill GEMM pacekern_ops/gemm_s8x16.py)
  int4  u8 [N, KP/2] two 4-bit weights per byte + bf16 scale and min per 32 weights (weights="int4",
        like llama.cpp's Q4_1; pacekern_ops/gemv_int4.py; activations are quantized per 32 values
        to int8 for the GEMV, and for the prefill GEMM pacekern_ops/gemm_int4.py). The LM head
        stays int8 when 4 bits would round it for the first time (a source head that was not
        4-bit: more than HEAD_INT4_MAX_ERROR relative error), as llama.cpp keeps its output layer
        at 6 bits in Q4 files
Layouts for the prefill GEMMs (packed panels) are built lazily, the first time a prompt is long
enough to use them, so a decode-only process never holds them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# relative Frobenius error of a 4-bit LM head above which weights="int4" keeps the head in int8: a
# head whose source was 4-bit comes back at ~0.5% (quantize_int4 recovers the grid), one that was
# 6- or 8-bit lands at ~4% (SmolLM2's: perplexity +11% with it at 4 bits, +0.1% with it at int8)
HEAD_INT4_MAX_ERROR = 0.02


@dataclass(frozen=True)
class ModelSpec:
    arch: str                 # "llama" | "qwen2"
    n_layers: int
    hidden: int               # H
    n_heads: int              # NH query heads
    n_kv_heads: int           # KVH key/value heads (grouped-query attention)
    head_dim: int             # D
    ffn: int                  # F, the MLP's inner size
    vocab: int                # V
    rope_theta: float
    rms_eps: float
    max_pos: int              # context length the model was trained for
    qkv_bias: bool            # Qwen2 has biases on q/k/v
    tie_embeddings: bool      # lm_head shares the embedding matrix
    bos_id: int | None
    eos_ids: tuple            # generation stops at any of these

    @classmethod
    def from_dir(cls, d: Path) -> "ModelSpec":
        cfg = json.loads((Path(d) / "config.json").read_text())
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        if archs[0] not in ARCHS:
            raise ValueError(f"{d}: architecture {archs[0]} is not supported (supported: {', '.join(ARCHS)})")
        gen = {}
        if (Path(d) / "generation_config.json").exists():
            gen = json.loads((Path(d) / "generation_config.json").read_text())
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope = cfg.get("rope_parameters") or {}
        heads = cfg["num_attention_heads"]
        return cls(arch=ARCHS[archs[0]], n_layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], n_heads=heads,
                   n_kv_heads=cfg.get("num_key_value_heads", heads),
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, ffn=cfg["intermediate_size"],
                   vocab=cfg["vocab_size"], rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                   rms_eps=float(cfg["rms_norm_eps"]), max_pos=cfg.get("max_position_embeddings", 4096),
                   qkv_bias=ARCHS[archs[0]] == "qwen2" or bool(cfg.get("attention_bias", False)),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), bos_id=cfg.get("bos_token_id"),
                   eos_ids=eos)

    @property
    def qkv_heads(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads

    def weight_bytes(self, fmt: str) -> int:
        """Bytes of weights read per decoded token (every linear layer once; embeddings are a lookup),
        from the shapes alone: no scales or padding (Weights.decode_bytes counts what is stored)."""
        per = {"f32": 4, "bf16": 2, "int8": 1, "int4": 0.5 + 4 / 32}[fmt]
        h, d = self.hidden, self.head_dim
        layer = h * self.qkv_heads * d + self.n_heads * d * h + 3 * h * self.ffn
        return int(per * (self.n_layers * layer + self.vocab * h))


@dataclass
class Linear:
    """y = x @ W^T (+ bias), W [N, K] in one format; `packed` caches the prefill GEMM layout."""
    fmt: str                                  # "f32" | "bf16" | "int8" | "int4"
    w: torch.Tensor                           # [N, K]: f32, bf16, or int8; int4: u8 [N, KP/2] packed
    scale: torch.Tensor | None = None         # int8: f32 [N] per output channel; int4: bf16 [N, KP/32] per group
    wsum: torch.Tensor | None = None          # int8: i32 [N] row sums (gemv_s8's unsigned-offset correction)
    bias: torch.Tensor | None = None          # f32 [N]
    packed: torch.Tensor | tuple | None = field(default=None, repr=False)
    torch_packed: tuple | None = field(default=None, repr=False)     # int4: torch's own int4 layout (OpConfig linear="torch")
    mins: torch.Tensor | None = None          # int4: bf16 [N, KP/32] per group
    k_in: int | None = None                   # int4: K before padding to a multiple of 512

    @property
    def n(self) -> int:
        return self.w.shape[0]

    @property
    def k(self) -> int:
        return self.k_in if self.k_in is not None else self.w.shape[1]

    @classmethod
    def make(cls, w: torch.Tensor, fmt: str, bias=None) -> "Linear":
        from pacekern_ops.gemv import quantize_rows
        b = None if bias is None else bias.float().contiguous()
        if fmt == "f32":
            return cls("f32", w.float().contiguous(), bias=b)
        if fmt == "bf16":
            return cls("bf16", w.to(torch.bfloat16).contiguous(), bias=b)
        if fmt == "int8":
            q, scale, wsum = quantize_rows(w)
            return cls("int8", q, scale=scale, wsum=wsum, bias=b)
        if fmt == "int4":
            from pacekern_ops.gemv_int4 import quantize_int4
            q, scale, mins = quantize_int4(w)
            return cls("int4", q, scale=scale, mins=mins, bias=b, k_in=w.shape[1])
        raise ValueError(f"unknown weight format '{fmt}' (f32, bf16, int8, int4)")

    def dequantized(self) -> torch.Tensor:
        """The weight as fp32 [N, K], exactly what the kernels multiply by."""
        if self.fmt == "int4":
            from pacekern_ops.gemv_int4 import dequantize_int4
            return dequantize_int4(self.w, self.scale, self.mins, self.k)
        if self.fmt == "int8":
            return self.w.float() * self.scale[:, None]
        return self.w.float()


@dataclass
class Layer:
    ln1: torch.Tensor         # f32 [H] input RMSNorm weight
    qkv: Linear               # [(NH + 2 KVH) D, H]
    o: Linear                 # [H, NH D]
    ln2: torch.Tensor         # f32 [H] post-attention RMSNorm weight
    gate_up: Linear           # [2 F, H]: gate rows then up rows
    down: Linear              # [H, F]


@dataclass
class Weights:
    spec: ModelSpec
    fmt: str
    embed: torch.Tensor       # f32 [V, H]
    layers: list
    norm: torch.Tensor        # f32 [H]
    lm_head: Linear           # [V, H], or [N, H] for a draft that proposes only N tokens
    head_ids: torch.Tensor | None = None   # i64 [N]: the token id of each head row (None: row = id)

    def decode_bytes(self) -> int:
        """Bytes the linear layers read per decoded token as stored: codes, scales, mins, row sums
        and padding (the DRAM roofline's numerator; embeddings are a lookup)."""
        lins = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return sum(t.nbytes for lin in lins + [self.lm_head] for t in (lin.w, lin.scale, lin.wsum, lin.mins, lin.bias)
                   if t is not None)


def load(d: Path, spec: ModelSpec, fmt: str) -> Weights:
    """Read the safetensors of an HF directory and lay the weights out for the kernels."""
    from safetensors import safe_open
    files = sorted(Path(d).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{d}: no *.safetensors files (convert the model first)")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                tensors[name] = st.get_tensor(name)

    def get(name):
        if name not in tensors:
            raise ValueError(f"{d}: tensor '{name}' is missing from the safetensors files")
        return tensors.pop(name)

    def norm_w(name):
        return get(name).float().contiguous()

    codes = Int4Codes(files) if fmt == "int4" else None

    def make(name, w, bias=None, max_error=None):
        return codes.make(name, w, bias, max_error) if codes else Linear.make(w, fmt, bias)

    layers = []
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        qkv_w = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        qkv_b = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) if spec.qkv_bias else None
        gate_up = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        layers.append(Layer(ln1=norm_w(p + "input_layernorm.weight"), qkv=make(p + "qkv", qkv_w, qkv_b),
                            o=make(p + "o", get(p + "self_attn.o_proj.weight")),
                            ln2=norm_w(p + "post_attention_layernorm.weight"), gate_up=make(p + "gate_up", gate_up),
                            down=make(p + "down", get(p + "mlp.down_proj.weight"))))
    if "model.embed_tokens.weight" not in tensors and "model.embed_tokens.extra" in tensors:
        embed = torch.cat([shared_embedding(d), get("model.embed_tokens.extra")]).float().contiguous()
    else:
        embed = get("model.embed_tokens.weight").float().contiguous()
    head = embed if spec.tie_embeddings or "lm_head.weight" not in tensors else get("lm_head.weight")
    head_ids = tensors.pop("lm_head.ids", None)         # a draft's reduced head: the tokens it can propose
    if head_ids is not None:
        head_ids = head_ids.long().contiguous()
        if head_ids.ndim != 1 or not 0 <= int(head_ids.min()) <= int(head_ids.max()) < spec.vocab:
            raise ValueError(f"{d}: lm_head.ids must be token ids in 0 .. {spec.vocab - 1}")
        head = head[head_ids]
    head = head.contiguous()
    lm_head = make("lm_head", head, max_error=HEAD_INT4_MAX_ERROR) or Linear.make(head, "int8")
    if codes:
        codes.save()
    return Weights(spec, fmt, embed, layers, norm_w("model.norm.weight"), lm_head, head_ids)


class Int4Codes:
    """The int4 codes of a model directory, kept in the cache (PACEKERN_CACHE_DIR/int4): quantizing
    a 1.5B model takes ~45 s on 2 cores, reading the codes back ~1 s. The key covers the source
    files (path, size, mtime) and the source of gemv_int4 (quantizer and layout), so a change to
    either re-quantizes."""

    def __init__(self, files, cache_dir: str | None = None):
        import hashlib
        import inspect
        from pacekern import env
        from pacekern_ops import gemv_int4
        h = hashlib.sha256(inspect.getsource(gemv_int4).encode())
        for f in files:
            st = Path(f).stat()
            h.update(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        self.path = Path(cache_dir or env.get("PACEKERN_CACHE_DIR")) / "int4" / f"{h.hexdigest()[:20]}.safetensors"
        self.cached, self.new = {}, {}
        if self.path.exists():
            from safetensors.torch import load_file
            try:
                self.cached = load_file(str(self.path))
            except Exception as e:                      # a damaged file: quantize again and replace it
                from pacekern.log import log
                log.warning(f"ignoring the unreadable int4 cache {self.path} ({e}); quantizing again")

    def make(self, name: str, w: torch.Tensor, bias=None, max_error: float | None = None) -> Linear | None:
        """The 4-bit linear for w, from the cache or quantized now. With max_error: None instead when
        ||dequantized - w|| / ||w|| exceeds it (the error is cached; rejected codes are not)."""
        err = self.cached.get(f"{name}.err")
        if max_error is not None and err is not None and float(err[0]) > max_error:
            return None
        b = None if bias is None else bias.float().contiguous()
        c = self.cached
        cached = f"{name}.w" in c and c[f"{name}.k"].item() == w.shape[1]
        lin = (Linear("int4", c[f"{name}.w"], scale=c[f"{name}.scale"], mins=c[f"{name}.mins"], bias=b, k_in=w.shape[1])
               if cached else Linear.make(w, "int4", bias))
        if max_error is not None and err is None:             # measured once, kept beside the codes
            err = float((lin.dequantized() - w.float()).norm() / w.float().norm().clamp(min=1e-30))
            self.new[f"{name}.err"] = torch.tensor([err])
            if err > max_error:
                return None
        if not cached:
            self.new.update({f"{name}.w": lin.w, f"{name}.scale": lin.scale, f"{name}.mins": lin.mins,
                             f"{name}.k": torch.tensor(lin.k)})
        return lin

    def save(self) -> None:
        """Write the codes if any were quantized now (atomically: a crash leaves no half file)."""
        if not self.new:
            return
        import os
        from safetensors.torch import save_file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        save_file({**self.cached, **self.new}, str(tmp))
        os.replace(tmp, self.path)


def shared_embedding(d: Path) -> torch.Tensor:
    """The embedding a draft shares with its target (config `pard_embed_from`: catalogue name or
    directory); the draft stores only the rows it adds (`model.embed_tokens.extra`)."""
    from safetensors import safe_open
    from .models import resolve
    src = json.loads((Path(d) / "config.json").read_text()).get("pard_embed_from")
    if src is None:
        raise ValueError(f"{d}: has model.embed_tokens.extra but its config.json has no `pard_embed_from`")
    for f in sorted(resolve(src).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if "model.embed_tokens.weight" in st.keys():
                return st.get_tensor("model.embed_tokens.weight")
    raise ValueError(f"{d}: `pard_embed_from` {src} has no model.embed_tokens.weight")
