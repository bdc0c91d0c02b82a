"""``fedtune roster``: the keys and the signed roster of authenticated secure aggregation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protocols.secagg.identity import RosterError, SignedRoster
from server.service import roster as tool


def test_identity_org_key_sign_and_show(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert tool.main(["identity", "--out", str(tmp_path / "a.key")]) == 0
    a_public = capsys.readouterr().out.rsplit(": ", 1)[1].strip()
    assert tool.main(["identity", "--out", str(tmp_path / "b.key")]) == 0
    capsys.readouterr()
    assert tool.main(["org-key", "--out", str(tmp_path / "org.key")]) == 0
    org_public = capsys.readouterr().out.rsplit(": ", 1)[1].strip()
    assert (tmp_path / "org.key").stat().st_mode & 0o777 == 0o600

    out = tmp_path / "roster.json"
    assert tool.main(["sign", "--org-key", str(tmp_path / "org.key"), "--out", str(out),
                      "--member", f"phone-a={a_public}",
                      "--member", f"phone-b={tmp_path / 'b.key'}", "--label", "pilot"]) == 0
    assert "signed roster of 2 devices" in capsys.readouterr().out
    roster = SignedRoster.from_text(tool.read_roster(out)).verify(bytes.fromhex(org_public))
    assert [name for name, _ in roster.members] == ["phone-a", "phone-b"]
    assert roster.members[0][1].hex() == a_public and roster.label == "pilot"

    assert tool.main(["show", str(out), "--org-public-key", org_public]) == 0
    shown = capsys.readouterr().out
    assert "2 devices, rounds of at least 2 (signature verified)" in shown and a_public in shown
    with pytest.raises(RosterError, match="not signed by the organisation key"):
        tool.main(["show", str(out), "--org-public-key", a_public])
    with pytest.raises(FileExistsError):  # a key is never overwritten
        tool.main(["org-key", "--out", str(tmp_path / "org.key")])


@pytest.mark.parametrize(("member", "match"), [
    ("phone-a", "expected NAME="),
    ("phone-a=abc", "expected NAME="),
    ("phone a=" + "ab" * 32, "device name"),
])
def test_bad_members_are_refused_by_name(tmp_path: Path, member: str, match: str) -> None:
    tool.main(["org-key", "--out", str(tmp_path / "org.key")])
    with pytest.raises(RosterError, match=match):
        tool.main(["sign", "--org-key", str(tmp_path / "org.key"), "--out",
                   str(tmp_path / "r.json"), "--member", member,
                   "--member", "other=" + "cd" * 32])


def test_a_bad_roster_file_is_one_clear_line_from_the_coordinator(tmp_path: Path) -> None:
    bad = tmp_path / "roster.json"
    bad.write_text('{"format": "fedtune-signed-roster/1"}')
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "coordinator", "--roster",
                           str(bad), "--cache-dir", str(tmp_path / "cache"), "--set",
                           "model.source=" + str(tmp_path / "no-model")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "signed roster" in done.stderr, done.stderr
