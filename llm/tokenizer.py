"""A model directory's tokenizer read with the `tokenizers` library and its chat template rendered
with jinja2: the same ids and text as transformers' AutoTokenizer (tests/test_tokenizer.py checks
it), without importing transformers' model machinery, which takes ~3.5 s here and would alone
break the "generating within 5 s" budget of a warm start."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Encoded:
    input_ids: list


def _token(v):
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    def __init__(self, d: Path):
        import tokenizers
        d = Path(d)
        if not (d / "tokenizer.json").exists():
            raise ValueError(f"{d}: no tokenizer.json (a fast tokenizer is needed)")
        self.tk = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
        self.bos_token, self.eos_token = _token(cfg.get("bos_token")), _token(cfg.get("eos_token"))
        self.bos_token_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.tk.token_to_id(self.eos_token) if self.eos_token else None
        tmpl = d / "chat_template.jinja"
        self.chat_template = tmpl.read_text() if tmpl.exists() else cfg.get("chat_template")
        self._template = None

    def __len__(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoded:
        return Encoded(self.encode(text, add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        """Render as transformers does: a sandboxed jinja2 environment with trim_blocks/lstrip_blocks."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ValueError(f"chat template: {msg}")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        text = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kw)
        return self.encode(text, add_special_tokens=False) if tokenize else text
