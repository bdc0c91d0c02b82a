"""The chatterbot corpus: short dialogues in 28 languages, one YAML file per category.

``chatterbot-corpus==1.3.3`` (the ``sim`` extra) is a pure-data wheel: its
``chatterbot_corpus/data/<language>/<category>.yml`` files each hold ``conversations:``, a
list of dialogues, each a list of utterances that answer one another. The package's own
``__init__`` is never imported (we only need its files), so the corpus is found with
``importlib.util.find_spec``.

Each dialogue becomes a chat :class:`Example` whose turns alternate user / assistant,
starting with the user; a trailing user turn (odd length) has no answer to train on and is
dropped. What the 1.3.3 data holds besides well-formed dialogues, and how it is handled:

* 8 entries are a single string (``"Question? - Answer"``: a YAML list marker lost its
  newline), and 2 dialogues have one utterance: skipped, there is no turn to answer;
* two files start with a UTF-8 byte-order mark (read as ``utf-8-sig``);
* category names are per language (``spanish/psicologia``, 42 names in all); a language x
  category file is one natural device (237 of them, 1 to 1050 dialogues each).

Scalars YAML reads as numbers or booleans are kept as their text; a dialogue with an empty
or structured (list / mapping) utterance is skipped, since its alternation is unknowable.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path
from typing import Any

from kernels.data.examples import Example, Turn
from kernels.data.formats import DataFormatError

PACKAGE = "chatterbot_corpus"
REQUIREMENT = "chatterbot-corpus==1.3.3"
#: The columns each conversation carries (what ``data.partition_by`` may name).
COLUMNS = ("device", "language", "category")


def corpus_root() -> Path:
    """The installed ``chatterbot_corpus/data`` folder (the package is not imported)."""
    from simulations.devices import DataNotAvailable  # devices imports this module lazily

    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        root = Path(location) / "data"
        if root.is_dir():
            return root
    raise DataNotAvailable(
        f"the chatterbot corpus is not installed{' (no data folder)' if locations else ''}; "
        f"`pip install {REQUIREMENT}` (or `pip install fedtune[sim]`)")


def corpus_files(root: Path | None = None) -> list[Path]:
    """Every ``<language>/<category>.yml`` file, sorted by language then category."""
    root = corpus_root() if root is None else root
    return sorted(root.glob("*/*.yml"), key=lambda p: (p.parent.name, p.stem))


def corpus_identity() -> dict[str, Any]:
    """What the devices made from the corpus depend on: its version and files (a cache key)."""
    root = corpus_root()
    try:
        version = metadata.version("chatterbot-corpus")
    except metadata.PackageNotFoundError:  # a source checkout on the path: files still count
        version = "unknown"
    return {"package": REQUIREMENT.split("==")[0], "version": version,
            "files": [(p.relative_to(root).as_posix(), p.stat().st_size)
                      for p in corpus_files(root)]}


def load_conversations() -> list[tuple[Example, dict[str, str]]]:
    """Every usable dialogue of every file, in file order, with its columns: ``device``
    (``language/category``), ``language`` and ``category``."""
    out: list[tuple[Example, dict[str, str]]] = []
    for file in corpus_files():
        language, category = file.parent.name, file.stem
        columns = {"device": f"{language}/{category}", "language": language,
                   "category": category}
        out += [(example, dict(columns)) for example in _file_conversations(file)]
    return out


def _file_conversations(file: Path) -> list[Example]:
    import yaml

    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{file}: not UTF-8 (byte {err.start}); reinstall "
                              f"{REQUIREMENT}") from None
    try:
        # safe_load's loader; its libyaml build when PyYAML has one (13x faster, same result
        # on the 1.3.3 files).
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise DataFormatError(f"{file}: not valid YAML ({err}); reinstall {REQUIREMENT}"
                              ) from None
    conversations = doc.get("conversations", 0) if isinstance(doc, dict) else 0
    conversations = [] if conversations is None else conversations  # `conversations:` bare
    if not isinstance(conversations, list):
        raise DataFormatError(f"{file}: expected a mapping with a 'conversations' list; "
                              f"reinstall {REQUIREMENT}")
    examples = []
    for conversation in conversations:
        utterances = _utterances(conversation)
        if utterances is None or len(utterances) < 2:
            continue
        utterances = utterances[:len(utterances) // 2 * 2]  # the last turn must be answered
        examples.append(Example(turns=tuple(
            Turn("user" if i % 2 == 0 else "assistant", u) for i, u in enumerate(utterances))))
    return examples


def _utterances(conversation: object) -> list[str] | None:
    """The dialogue's utterances as text, or None if it is not a list of non-empty scalars."""
    if not isinstance(conversation, list):
        return None
    utterances = []
    for item in conversation:
        if isinstance(item, list | dict) or item is None:
            return None
        text = str(item).strip()
        if not text:
            return None
        utterances.append(text)
    return utterances
