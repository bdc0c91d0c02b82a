"""``fedtune certs``: a development CA, the SuperLink's TLS certificate, SuperNode key pairs.

Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port; the SuperLink
takes ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` and SuperNodes, the ServerApp's
SuperExec and the ``flwr`` CLI verify it against the CA. Python's ``ssl`` (OpenSSL 3)
rejects a CA without ``basicConstraints CA:TRUE`` and a server certificate without a
subjectAltName, so both are written explicitly here (an IP SAN for ``127.0.0.1``).

SuperNode authentication takes an EC key on a NIST curve in OpenSSH format
(``flower-supernode --auth-supernode-private-key``; ``flwr supernode register`` reads the
``ecdsa-sha2-nistp384 ...`` public key), the equivalent of ``ssh-keygen -t ecdsa -b 384``.

These are development credentials: for production use an organisation CA, keep the CA key
offline, and generate each device's key on the device (only the ``.pub`` leaves it).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS material: give ``ca_cert`` to every SuperNode and CLI user."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """One SuperNode's authentication key pair (OpenSSH format)."""

    name: str
    private_key: Path
    public_key: Path


def tls_files(out_dir: Path) -> TlsFiles:
    """Where :func:`make_tls` writes (and later finds) the TLS files in ``out_dir``."""
    return TlsFiles(out_dir / "ca.pem", out_dir / "ca.key", out_dir / "superlink.pem",
                    out_dir / "superlink.key")


def node_key_files(out_dir: Path, name: str) -> NodeKeys:
    """Where :func:`make_node_keys` writes node ``name``'s key pair in ``out_dir``."""
    if not _NODE_NAME.match(name):
        raise ValueError(
            f"node name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
            "(it becomes a file name)"
        )
    return NodeKeys(name, out_dir / "nodes" / f"{name}.key",
                    out_dir / "nodes" / f"{name}.pub")


def make_tls(
    out_dir: Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    force: bool = False,
) -> TlsFiles:
    """Write a CA and a SuperLink certificate valid for ``hosts``; reuse existing files.

    Existing files are kept unless ``force``: SuperNodes already pin the CA, and a new CA
    would lock them out.
    """
    files = tls_files(out_dir)
    paths = (files.ca_cert, files.ca_key, files.server_cert, files.server_key)
    if not force and all(p.is_file() for p in paths):
        return files
    if not hosts:
        raise ValueError("hosts: the SuperLink certificate needs at least one host name or IP")
    if days < 1:
        raise ValueError(f"days = {days}: must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate small clock skew
    not_after = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune development CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(files.ca_key, ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_node_keys(out_dir: Path, name: str, *, force: bool = False) -> NodeKeys:
    """Write SuperNode ``name``'s P-384 key pair in OpenSSH format; reuse an existing one."""
    keys = node_key_files(out_dir, name)
    if not force and keys.private_key.is_file() and keys.public_key.is_file():
        return keys
    keys.private_key.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(keys.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    keys.public_key.write_bytes(public + f" fedtune-{name}\n".encode())
    return keys


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """Create a key file readable by its owner only (0600) before any byte is written."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune certs",
        description="Make development TLS credentials for a SuperLink (a CA and a server "
        "certificate) and authentication key pairs for SuperNodes. Existing files are "
        "reused unless --force.",
    )
    parser.add_argument("--out", type=Path, default=Path(".fedtune-deploy/certs"),
                        help="output folder (default: ./.fedtune-deploy/certs)")
    parser.add_argument("--host", dest="hosts", action="append", default=None,
                        metavar="NAME_OR_IP",
                        help="host name or IP the SuperLink is reached at; repeatable "
                             "(default: 127.0.0.1 and localhost)")
    parser.add_argument("--nodes", type=int, default=0,
                        help="also make key pairs node-0 .. node-(N-1)")
    parser.add_argument("--node", dest="node_names", action="append", default=[],
                        metavar="NAME", help="also make a key pair for this node; repeatable")
    parser.add_argument("--days", type=int, default=365, help="certificate validity")
    parser.add_argument("--force", action="store_true", help="regenerate existing files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nodes < 0:
        raise ValueError(f"--nodes = {args.nodes}: must be >= 0")
    files = make_tls(args.out, hosts=args.hosts or DEFAULT_HOSTS, days=args.days,
                     force=args.force)
    print(f"CA certificate (give to SuperNodes): {files.ca_cert}")
    print(f"SuperLink certificate / key:         {files.server_cert} / {files.server_key}")
    names = [f"node-{i}" for i in range(args.nodes)] + list(args.node_names)
    for name in names:
        keys = make_node_keys(args.out, name, force=args.force)
        print(f"SuperNode {name}: private {keys.private_key}, public {keys.public_key}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
