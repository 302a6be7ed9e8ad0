"""Text as SigLIP was trained on it, as a function: what `canonical` and `lower` make of a text, and the bound on
a text's cost (siglip_cli/text.py). Token ids and every path through the CLI: tests/test_text.py."""

from __future__ import annotations

import pytest

from siglip_cli.text import CLEAN_CHARS, RAW_CHARS, clean, prepare

from helpers import open_clip_tokenizer

pytestmark = pytest.mark.deps  # ftfy, and open_clip's rules as the reference

# written out by hand from the rules: ftfy, HTML unescaped twice, "_" to a space, ASCII punctuation dropped,
# lowercased, whitespace collapsed
CANONICAL = {
    "A Photo, of: my_dog!": "a photo of my dog",
    "This is a photo of a T-Shirt.": "this is a photo of a tshirt",
    "rock & roll &amp;amp; jazz": "rock roll jazz",
    "it&#39;s": "its",
    "cafÃ© au lait": "café au lait",  # mojibake mended
    "  spaces\tand\nnewlines  ": "spaces and newlines",
    "snake_case_tag": "snake case tag",
    "¿Qué?": "¿qué",  # only ASCII punctuation goes
    "...": "",
}


def test_canonical_rules_clean_as_written_by_hand():
    assert [clean(t) for t in CANONICAL] == list(CANONICAL.values())
    assert prepare(list(CANONICAL)) == list(CANONICAL.values())


def test_canonical_rules_equal_open_clips_canonicalize():
    canonicalize = open_clip_tokenizer().get_clean_fn("canonicalize")
    texts = [*CANONICAL, "emoji 🐶🌊 beach", "東京の夜景", "C++ (programming)", "100% cotton", "", "a " * 80 + "dog"]
    assert [clean(t) for t in texts] == [canonicalize(t) for t in texts]


def test_lower_rules_only_lowercase():
    assert clean("A Photo, of: my_dog!", "lower") == "a photo, of: my_dog!"
    assert prepare(["It&#39;s", "T-Shirt"], "lower") == ["it&#39;s", "t-shirt"]


def test_unknown_rules_are_refused():
    with pytest.raises(ValueError, match="one of canonical, lower"):
        clean("a dog", "upper")


def test_a_texts_cost_is_bounded_whatever_its_length():
    """An 8 MB text is cut before it is cleaned and after: the tokens read are the same, the work bounded."""
    assert clean("x" * (RAW_CHARS + 10)) == "x" * CLEAN_CHARS
    long = clean("hello world " * 700_000)
    assert len(long) <= CLEAN_CHARS and long.startswith("hello world hello")
    assert len(clean("Hello " * 100_000, "lower")) == CLEAN_CHARS
