"""What a text becomes before the tokenizer: SigLIP's training rules (torch-free).

`canonical` (the default) is open_clip's `clean="canonicalize"`, which its SigLIP and SigLIP 2 configs set, as
big_vision trained them: ftfy, HTML unescaped twice, `_` to a space, ASCII punctuation dropped, lowercased,
whitespace collapsed. `lower` is what transformers' tokenizers do alone (lowercased by us), for exact parity
with a plain transformers loop.
"""

from __future__ import annotations

import html
import string

RULES = ("canonical", "lower")
DEFAULT_RULES = "canonical"
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# The model reads 64 tokens. A text is cut to its first RAW_CHARS characters before it is cleaned, and to
# CLEAN_CHARS after (64 tokens of 64 characters each): the cost of a text is bounded whatever its length (an
# 8 MB text took a server's tokenizer to gigabytes), and the tokens the model reads are the same.
RAW_CHARS = 65_536
CLEAN_CHARS = 4_096


def clean(text: str, rules: str = DEFAULT_RULES) -> str:
    """One text as the model is given it under `rules` (see the module docstring), cut as RAW_CHARS says."""
    text = text[:RAW_CHARS]
    if rules == "lower":
        return text.lower()[:CLEAN_CHARS]
    if rules != "canonical":
        raise ValueError(f"text rules {rules!r}: one of {', '.join(RULES)}")
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.replace("_", " ").translate(_PUNCTUATION).lower().split())[:CLEAN_CHARS]


def prepare(texts, rules: str = DEFAULT_RULES) -> list[str]:
    """Every text cleaned under `rules`."""
    return [clean(t, rules) for t in texts]
