"""ALBEF caption cleaning.

`pre_caption` reproduces ALBEF's `dataset/utils.py` rules: lowercase, drop the punctuation
``, . ' ! ? " ( ) * # : ; ~``, turn ``-`` and ``/`` into spaces, ``<person>`` into ``person``,
collapse runs of whitespace, strip, and keep the first `max_words` words. An empty result means
the sample has no usable caption (the datasets count it as ``empty_caption``).
"""
import re

_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int) -> str:
    """Clean `caption` the way ALBEF does and truncate it to `max_words` words."""
    caption = _PUNCTUATION.sub("", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
