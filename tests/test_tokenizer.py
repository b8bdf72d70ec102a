"""Our tokenizer (tokenizers + jinja2) against transformers' AutoTokenizer on the same files."""
import os

import pytest

from llm import models
from llm.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXTS = ["The capital of France is", "  leading spaces\n\ttabs and ünïcödé — 漢字 🙂", "def f(x):\n    return x**2\n",
         "<|im_start|>user\nHi<|im_end|>", ""]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]


@pytest.mark.parametrize("name", ["smollm2-135m-instruct",
                                  pytest.param("qwen2.5-coder-0.5b-instruct", marks=pytest.mark.heavy)])
def test_same_as_transformers(name):
    from transformers import AutoTokenizer
    d = models.resolve(name)
    ours, ref = Tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    assert len(ours) == len(ref) and ours.eos_token_id == ref.eos_token_id
    for t in TEXTS:
        ids = ref(t).input_ids
        assert ours(t).input_ids == ids
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids) == ref.decode(ids)
    for c in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(c, add_generation_prompt=gen) == \
                ref.apply_chat_template(c, add_generation_prompt=gen, tokenize=False)
