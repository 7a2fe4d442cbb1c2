"""What the tests of the commands share: `swarm-api` started as a subprocess."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from layerswarm.cli.api import READY_PREFIX


@contextmanager
def open_api_process(
    model_dir: Path, peers: list[str], extra: tuple[str, ...] = (), log: Path | None = None
) -> Iterator[str]:
    """`swarm-api` in front of `peers`, as a subprocess, its log to `log`; yields its base URL."""
    cmd = [sys.executable, "-m", "layerswarm.cli.api", "--model", str(model_dir)]
    cmd += [arg for address in peers for arg in ("--peer", address)]
    cmd += ["--host", "127.0.0.1", "--port", "0", *extra]
    with open(log or os.devnull, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        yield wait_ready(proc)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0  # SIGTERM is a clean stop
        assert proc.stdout is not None
        proc.stdout.close()


def wait_ready(proc: subprocess.Popen[str], timeout: float = 120.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            if line.startswith(READY_PREFIX):
                return str(json.loads(line[len(READY_PREFIX) :])["url"])
    proc.kill()
    raise AssertionError("swarm-api did not get ready")


@pytest.fixture(scope="session")
def open_api() -> Callable[..., AbstractContextManager[str]]:
    """`open_api(model_dir, peers, extra=(), log=None)`: a context that yields the API's URL."""
    return open_api_process


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: `(cert.pem, key.pem)`."""
    return self_signed(tmp_path_factory.mktemp("tls"))


def self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
