"""``fedtune roster``: identity keys for devices and the organisation's signed roster.

Authenticated secure aggregation (:mod:`protocols.secagg.identity`) needs three parties'
keys, and none of them is the coordinator's:

1. each **device** makes its identity key on the device (``fedtune roster identity --out
   identity.key``; only the printed public key leaves it) and names the file in its
   ``fedtune client`` config (``[node] identity_key``);
2. the **organisation** makes its roster key once, offline (``fedtune roster org-key --out
   org.key``), gives its public half to every device (``[privacy] roster_public_key``) and
   signs the roster of admitted devices' public keys (``fedtune roster sign``);
3. the **coordinator** relays the signed roster (``fedtune coordinator --roster
   roster.json``). It cannot change it: devices check the organisation's signature.

A device is revoked by signing a new roster without it; devices pin the organisation key,
not a roster, so the coordinator could replay an older roster that still lists the device
(see the threat model in the README): rotate the organisation key after a revocation that
matters.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from protocols.manifest import (
    generate_signing_key,
    load_private_key,
    public_key_bytes,
    save_private_key,
)
from protocols.secagg.identity import Roster, RosterError, SignedRoster, identity_public_key

_MEMBER = re.compile(r"^(?P<name>[^=]+)=(?P<key>[0-9a-fA-F]{64})$")


def make_key(path: Path) -> str:
    """A new Ed25519 key at ``path`` (mode 0600, never overwritten); its public key in hex."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key()
    save_private_key(key, path)
    return public_key_bytes(key.public_key()).hex()


def sign_roster(org_key: Path, members: dict[str, bytes], out: Path, *,
                label: str = "", min_nodes: int | None = None) -> SignedRoster:
    """Sign the roster of ``members`` (device name -> identity public key), with the
    organisation's floor on a round's size, into ``out``."""
    signed = SignedRoster.sign(Roster.of(members, label=label, min_nodes=min_nodes),
                               load_private_key(org_key))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(signed.to_text() + "\n")
    return signed


def parse_member(text: str) -> tuple[str, bytes]:
    """``NAME=HEX`` (64 hex digits, a device's identity public key) or ``NAME=PATH`` of a
    device's identity key file (development set-ups that keep the files together)."""
    match = _MEMBER.fullmatch(text.strip())
    if match:
        return match["name"], bytes.fromhex(match["key"])
    name, sep, path = text.partition("=")
    if not sep or not Path(path).is_file():
        raise RosterError(f"--member {text!r}: expected NAME=<64 hex digits of the device's "
                          "identity public key> or NAME=<its identity key file>")
    return name, identity_public_key(load_private_key(Path(path)))


def read_roster(path: Path) -> str:
    """A signed roster file's text, checked for form (the devices check the signature)."""
    text = Path(path).read_text().strip()
    SignedRoster.from_text(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune roster",
        description="Identity keys and the organisation's signed roster of devices, for "
        "authenticated secure aggregation (the coordinator relays the roster but cannot "
        "forge it).")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    ident = sub.add_parser("identity", help="make this device's identity key",
                           description="Run on the device; only the printed public key "
                           "leaves it.")
    ident.add_argument("--out", type=Path, required=True, help="the private key file")
    org = sub.add_parser("org-key", help="make the organisation's roster key",
                         description="Keep it offline; devices pin the printed public key "
                         "([privacy] roster_public_key).")
    org.add_argument("--out", type=Path, required=True, help="the private key file")
    sign = sub.add_parser("sign", help="sign the roster of admitted devices",
                          description="Sign the list of devices allowed in secure "
                          "aggregation; give the file to the coordinator (--roster).")
    sign.add_argument("--org-key", type=Path, required=True, help="the organisation's key")
    sign.add_argument("--member", action="append", default=[], required=True,
                      metavar="NAME=KEY",
                      help="a device: NAME=<hex public key> or NAME=<identity key file>; "
                           "repeatable")
    sign.add_argument("--label", default="", help="free text kept in the roster")
    sign.add_argument("--min-nodes", type=int, default=None,
                      help="the fewest devices a secure-aggregation round may have (devices "
                           "refuse smaller rounds: a coordinator colluding with the other "
                           "devices of a small round would learn a device's update; "
                           "default 3)")
    sign.add_argument("--out", type=Path, required=True, help="the signed roster file")
    show = sub.add_parser("show", help="list a roster's devices (and check its signature)")
    show.add_argument("roster", type=Path)
    show.add_argument("--org-public-key", default="",
                      help="hex of the organisation key: check the signature too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action in ("identity", "org-key"):
        public = make_key(args.out)
        pin = ("identity public key (give to the organisation)" if args.action == "identity"
               else "roster public key (every device pins it)")
        print(f"{pin}: {public}")
        return 0
    if args.action == "sign":
        members = dict(parse_member(m) for m in args.member)
        if len(members) != len(args.member):
            raise RosterError("--member: a device name is given twice")
        sign_roster(args.org_key, members, args.out, label=args.label,
                    min_nodes=args.min_nodes)
        print(f"signed roster of {len(members)} devices: {args.out}")
        return 0
    signed = SignedRoster.from_text(read_roster(args.roster))
    roster = (signed.verify(bytes.fromhex(args.org_public_key)) if args.org_public_key
              else signed.unverified())
    status = "signature verified" if args.org_public_key else "signature NOT checked"
    print(f"roster {roster.label!r} of {roster.created}, {len(roster.members)} devices, "
          f"rounds of at least {roster.min_nodes} ({status}):")
    for name, key in roster.members:
        print(f"  {name}  {key.hex()}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
