"""Vocabulary and label lines as users write them: comments, spaces, thresholds, duplicates (siglip_cli/vocab.py)."""

from __future__ import annotations

import pytest

from siglip_cli.errors import UsageError
from siglip_cli.vocab import parse_vocab


def test_vocab_parsing(capsys):
    v = parse_vocab(
        ["# a comment", "", "  dog  ", "Cat\t0.25", "dog", "DOG", "   # indented comment", "bird\t 1 "], "v"
    )
    assert v.tags == ("dog", "Cat", "bird") and v.thresholds == (None, 0.25, 1.0)
    assert "dropped 2 duplicate(s)" in capsys.readouterr().err
    for bad in (["cat\tmany"], ["cat\t1.5"], ["cat\t-0.1"], ["\t0.5"], ["# only comments", ""]):
        with pytest.raises(UsageError):
            parse_vocab(bad, "v")


def test_labels_keep_what_a_vocabulary_would_drop_and_take_no_threshold():
    """--labels: '#1' is a label, not a comment; a tab-separated threshold is refused, naming its line."""
    labels = parse_vocab(["#1", "#2", "a red car"], "--labels", allow_thresholds=False, comments=False)
    assert labels.tags == ("#1", "#2", "a red car") and labels.thresholds == (None, None, None)
    with pytest.raises(UsageError, match="--labels, line 2: labels take no threshold"):
        parse_vocab(["cat", "dog\t0.5"], "--labels", allow_thresholds=False, comments=False)
    with pytest.raises(UsageError, match="v, line 3: threshold '2' is not a number from 0 to 1"):
        parse_vocab(["cat", "", "dog\t2"], "v")
