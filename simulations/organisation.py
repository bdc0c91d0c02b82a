"""The organisation a simulation plays: its roster key, each device's identity key, the roster.

In a deployment an organisation admits devices: each device makes its own Ed25519 identity
key (``fedtune roster identity``), the organisation signs the roster of their public keys
with a key it keeps offline (``fedtune roster sign``) and every device pins that key
(:mod:`protocols.secagg.identity`). A simulation plays every party, so it makes these here:
the organisation key in the cache (``simulated-org/org.key``), each simulated device's
identity key beside its data folder (``identity/<partition>.key``, read only by that
device's ClientApp),
and a freshly signed roster per run, which the coordinator relays in every SecAgg setup.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.app import simulated_identity_key
from protocols.manifest import (
    generate_signing_key,
    load_private_key,
    public_key_bytes,
    save_private_key,
)
from protocols.secagg.identity import Roster, SignedRoster, identity_public_key

ORG_KEY = Path("simulated-org") / "org.key"


@dataclass(frozen=True)
class SimulatedOrganisation:
    """What a simulated run needs for authenticated secure aggregation."""

    roster_text: str  # SignedRoster text: the coordinator relays it
    org_public_key: str  # hex: what every (simulated) device pins


def _ensure_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key at ``path``, made on first use."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # made concurrently by another run
            save_private_key(generate_signing_key(), path)
    return load_private_key(path)


def simulated_organisation(devices_root: Path, num_clients: int, cache_dir: Path, *,
                           min_nodes: int | None = None) -> SimulatedOrganisation:
    """Sign a roster of the identity keys of simulated devices ``0 .. num_clients - 1``
    under ``devices_root`` (making missing keys); ``min_nodes`` is the organisation's floor
    on a round's size (a simulation: its clients per round)."""
    org_key = _ensure_key(cache_dir / ORG_KEY)
    members = {f"device-{pid}": identity_public_key(
                   _ensure_key(simulated_identity_key(devices_root, pid)))
               for pid in range(num_clients)}
    roster = Roster.of(members, label=f"simulated devices of {devices_root.name}",
                       min_nodes=min_nodes)
    return SimulatedOrganisation(SignedRoster.sign(roster, org_key).to_text(),
                                 public_key_bytes(org_key.public_key()).hex())
