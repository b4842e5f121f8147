"""The demo world's tokenizer: a character-level vocabulary built offline with `tokenizers`, and a
chat template. The shipped demo base uses it, and so do the tiny models of the tests
(`expertlib.testing` re-exports it)."""

from __future__ import annotations

import string
from pathlib import Path

#: Characters of the offline tokenizer (plus special tokens).
CHARSET = string.ascii_letters + string.digits + string.punctuation + " \n"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<s>Q: {{ m['content'] }}\n{% elif m['role'] == 'system' %}<s>{{ m['content'] }}\n"
    "{% else %}A: {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def make_tokenizer(path: str | Path | None = None):
    """A character-level fast tokenizer (vocab ~100) with a chat template; saved to `path` if given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARSET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


__all__ = ["CHARSET", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_tokenizer"]
