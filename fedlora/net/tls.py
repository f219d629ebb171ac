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


def transport_hint(host: str, port: int, ca: Path | None, timeout: float = 3.0) -> str | None:
    """What a client's flags get wrong about a reachable server's transport, in one line, or None
    (it speaks what the flags say, or it cannot be reached yet: the client retries).

    Without ``ca`` (``--insecure``) a plain HTTP request is sent: a plain SuperLink answers
    ``HTTP/1.1 ...``, a TLS one closes (or resets) the connection. With ``ca`` a TLS handshake is
    made: a plain server answers it with an HTTP response (``WRONG_VERSION_NUMBER``), a server whose
    certificate ``ca`` did not sign fails its verification. Without a hint the client's own retries say only
    that the server disconnected.
    """
    import ssl

    where = f"the server at {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    with sock:
        try:
            if ca is None:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: fedlora\r\nConnection: close\r\n\r\n")
                try:
                    first = sock.recv(5)
                except TimeoutError:
                    return None
                except OSError:  # reset: the handshake it expected failed
                    first = b""
                if not first.startswith(b"HTTP/"):
                    return f"{where} speaks TLS: pass --root-certificates CA.pem instead of --insecure"
                return None
            context = ssl.create_default_context(cafile=str(ca))
            context.wrap_socket(sock, server_hostname=host).close()
        except ssl.SSLCertVerificationError as exc:
            return (f"{where} has a certificate that --root-certificates {str(ca)!r} does not verify"
                    f" ({exc.verify_message}): pass the CA that signed it")
        except ssl.SSLError as exc:
            if "WRONG_VERSION_NUMBER" in str(exc):
                return f"{where} speaks plain HTTP (no TLS): pass --insecure instead of --root-certificates"
        except OSError:
            return None
    return None
