"""Checks of certificate and key files before they reach Flower, each failing in one line."""

from __future__ import annotations

import socket
from pathlib import Path

from fedlora.errors import UserError


def _read(path: str | Path, flag: str) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{flag} {str(path)!r}: file not found")
    return p.read_bytes()


def check_certificate(path: str | Path, flag: str) -> None:
    """A PEM X.509 certificate (or bundle)."""
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(_read(path, flag))
    except ValueError:
        raise UserError(f"{flag} {str(path)!r} is not a PEM certificate"
                        " (expected '-----BEGIN CERTIFICATE-----')") from None


def check_private_key(path: str | Path, flag: str) -> None:
    """A PEM or OpenSSH private key without a passphrase."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read(path, flag)
    loaders = (serialization.load_pem_private_key, serialization.load_ssh_private_key)
    for load in loaders:
        try:
            load(data, password=None)
            return
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    raise UserError(f"{flag} {str(path)!r} is not an unencrypted PEM or OpenSSH private key")


def check_public_key(path: str | Path, flag: str) -> None:
    """An OpenSSH elliptic-curve public key (``ecdsa-sha2-nistp384 ...``), as Flower registers."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        key = load_ssh_public_key(_read(path, flag))
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UserError(f"{flag} {str(path)!r} is not an OpenSSH EC public key"
                        " (make one with: ssh-keygen -t ecdsa -b 384 -N '' -f node_key)")


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` -> ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{flag} {text!r} is not HOST:PORT (e.g. 192.168.1.10:8000)")
    return host.strip("[]"), int(port)


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse a port this machine cannot listen on."""
    if not 0 < port < 65536:
        raise UserError(f"{flag} {port} is not a TCP port (1-65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another {flag}"
                            " or stop what is using it") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A currently unused TCP port."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
