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


def clean(text: str, rules: str = DEFAULT_RULES) -> str:
    """One text as the model is given it under `rules` (see the module docstring)."""
    if rules == "lower":
        return text.lower()
    if rules != "canonical":
        raise ValueError(f"text rules {rules!r}: one of {', '.join(RULES)}")
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.replace("_", " ").translate(_PUNCTUATION).lower().split())


def prepare(texts, rules: str = DEFAULT_RULES) -> list[str]:
    """Every text cleaned under `rules`."""
    return [clean(t, rules) for t in texts]
