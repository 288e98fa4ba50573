"""TLS for the tests' throwaway servers: certificates made with openssl, a server's TLS-only
settings and a client's TLS arguments, one definition each (tests/redis_proc.py and
tests/secure_redis.py use them)::

    certs = make_certs(tmp_path / "certs")        # a CA, the server's and a client's
    tls_directives(certs, port)                   # [("port", "0"), ("tls-port", "<port>"), …]
    redis.Redis(port=port, **tls_client_kwargs(certs))
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing here: the wrong one."""


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(folder: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    f = {n: str(folder / n) for n in ("ca.key", "ca.crt", "other.key", "other.crt", "ext.cnf")}
    for key, crt, cn in (("ca.key", "ca.crt", "yichui test CA"), ("other.key", "other.crt", "x")):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                 f"/CN={cn}", "-keyout", f[key], "-out", f[crt])  # fmt: skip
    Path(f["ext.cnf"]).write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    for name in ("server", "client"):
        key, csr, crt = (str(folder / f"{name}.{e}") for e in ("key", "csr", "crt"))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key,
                 "-out", csr)  # fmt: skip
        _openssl("x509", "-req", "-in", csr, "-CA", f["ca.crt"], "-CAkey", f["ca.key"],
                 "-CAcreateserial", "-days", "2", "-extfile", f["ext.cnf"],
                 "-out", crt)  # fmt: skip
    return Certs(
        ca=folder / "ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
        other_ca=folder / "other.crt",
    )


def tls_directives(certs: Certs, port: int) -> list[tuple[str, str]]:
    """A server (or Sentinel) on TLS only, at ``port``, asking for client certificates; its own
    connections (a replica's to its master, a Sentinel's to the servers and the other
    Sentinels) are TLS too, with the server certificate as the client's. As (directive, value)
    pairs: ``--name value`` on a command line, ``name value`` in a config file."""
    return [
        ("port", "0"),
        ("tls-port", str(port)),
        ("tls-cert-file", str(certs.server_cert)),
        ("tls-key-file", str(certs.server_key)),
        ("tls-ca-cert-file", str(certs.ca)),
        ("tls-auth-clients", "yes"),
        ("tls-replication", "yes"),
    ]


def tls_args(certs: Certs, port: int) -> list[str]:
    """:func:`tls_directives` as redis-server arguments."""
    return [a for name, value in tls_directives(certs, port) for a in (f"--{name}", value)]


def tls_client_kwargs(certs: Certs | None) -> dict[str, Any]:
    """redis-py's arguments for a TLS client with the client certificate; ``{}`` for None."""
    if certs is None:
        return {}
    return {"ssl": True, "ssl_ca_certs": str(certs.ca), "ssl_certfile": str(certs.client_cert),
            "ssl_keyfile": str(certs.client_key)}  # fmt: skip
