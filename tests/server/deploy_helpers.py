"""Real ``fedlora-server`` / ``fedlora-client`` processes on loopback, and test PKI."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

BIN = Path(sys.executable).parent


def free_port() -> int:
    from fedlora.net.tls import free_port as fp

    return fp()


class Proc:
    """A console-script process in its own session, logging to a file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict | None = None) -> None:
        self.log = log
        self.fh = log.open("wb")
        # PATH: the venv's console scripts (flower-superexec, ...) even when it is not activated
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        env = dict(os.environ, PATH=path, HF_HUB_OFFLINE="1", FLWR_DISABLE_UPDATE_CHECK="1",
                   FEDLORA_LEDGER_DIR=str(log.parent / "ledgers"),
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **(env or {}))
        self.p = subprocess.Popen([str(BIN / name), *args], stdout=self.fh, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"timed out; log:\n{self.text()[-3000:]}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.fh.close()

    def text(self) -> str:
        return self.log.read_text(errors="ignore")


def server(tmp: Path, port: int, out: Path, *extra: str, name: str = "server") -> Proc:
    return Proc("fedlora-server", ["--port", str(port), "--out", str(out), *extra], tmp / f"{name}.log")


def client(tmp: Path, port: int, pid: int, n: int, *extra: str, name: str | None = None,
           env: dict | None = None) -> Proc:
    return Proc("fedlora-client", ["--server", f"127.0.0.1:{port}", "--partition-id", str(pid),
                                   "--num-partitions", str(n), "--poll", "0.1", *extra],
                tmp / f"{name or f'client{pid}'}.log", env)


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def wait_for_round(out: Path, rnd: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["round"] >= rnd for r in rows(out)):
            return
        time.sleep(0.2)
    raise AssertionError(f"round {rnd} not reached in {timeout}s")


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedlora test CA")).issuer_name(name("fedlora test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - day).not_valid_after(now + 2 * day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - day).not_valid_after(now + 2 * day)
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An OpenSSH EC key pair, as ``ssh-keygen -t ecdsa -b 384`` makes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub
