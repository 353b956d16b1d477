"""``extproc certs``: a local CA, a server certificate for the picker and a client certificate for Envoy.

For docker compose, `extproc up`/`start_stack` and the tests: what cert-manager or OpenShift's service CA issue in
a cluster, made on a laptop. The ``openssl`` command does the cryptography (it is on every Linux machine and in
the project's image), so the package needs no extra dependency. Keys are EC P-256: fast to make, and served by
gRPC, Envoy and Python's ssl alike.

Files written to ``--out`` (the names `extproc up --config` and docs/tls.md rely on)::

    ca.crt ca.key            the local CA (keep ca.key to issue more; nothing else needs it)
    server.crt server.key    the picker's: SANs from --hosts; server.tls.cert_file / key_file
    client.crt client.key    Envoy's (or a probe's) for mTLS; the picker checks it against ca.crt (client_ca_file)
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from extproc.cli import DefaultsHelp
from extproc.tls import ClientTls

if TYPE_CHECKING:
    from extproc.local.procs import Child

# localhost for `extproc up` and the tests; extproc and extproc-2 are the picker services of docker-compose.yaml.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", "extproc", "extproc-2")
DEFAULT_DAYS = 365
CLIENT_NAME = "envoy"


class CertsError(RuntimeError):
    """openssl is missing or refused a step; the message says which."""


@dataclass(frozen=True)
class LocalCerts:
    """The files of one `extproc certs` directory."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    @classmethod
    def beside(cls, cert_file: str | Path) -> LocalCerts | None:
        """The `extproc certs` directory ``cert_file`` lives in, if it is one (all six files there)."""
        found = cls(Path(cert_file).parent)
        files = (found.ca, found.server_cert, found.server_key, found.client_cert, found.client_key)
        return found if Path(cert_file).name == "server.crt" and all(f.is_file() for f in files) else None

    def server_tls(self, mutual: bool = True) -> dict[str, str]:
        """The ``server.tls`` section serving these files; ``mutual``: clients need a certificate from this CA."""
        section = {"cert_file": str(self.server_cert), "key_file": str(self.server_key)}
        if mutual:
            section["client_ca_file"] = str(self.ca)
        return section

    def client(self, server_name: str | None = None, with_certificate: bool = True) -> ClientTls:
        """How Envoy, a probe or a test reaches the picker: trust the CA, verify ``server_name``, show client.crt."""
        if not with_certificate:
            return ClientTls(str(self.ca), server_name)
        return ClientTls(str(self.ca), server_name, str(self.client_cert), str(self.client_key))


def _openssl(*args: str, cwd: Path | None = None) -> str:
    binary = shutil.which("openssl")
    if binary is None:
        raise CertsError("the openssl command is not installed (Debian/Ubuntu: apt-get install openssl)")
    done = subprocess.run([binary, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False)
    if done.returncode != 0:
        raise CertsError(f"openssl {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def _san(hosts: Sequence[str]) -> str:
    names = []
    for host in hosts:
        try:
            names.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            names.append(f"DNS:{host}")
    return ",".join(names)


def make_ca(directory: Path, name: str = "extproc-router local CA", days: int = DEFAULT_DAYS) -> LocalCerts:
    """A self-signed CA in ``directory`` (ca.crt, ca.key)."""
    certs = LocalCerts(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _new_key(certs.ca_key)
    _openssl(
        "req", "-x509", "-new", "-key", str(certs.ca_key), "-subj", f"/CN={name}", "-days", str(days),
        "-set_serial", str(secrets.randbits(63)),
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(certs.ca),
    )  # fmt: skip
    return certs


def issue(
    certs: LocalCerts,
    cert: Path,
    key: Path,
    common_name: str,
    hosts: Sequence[str] = (),
    usage: str = "serverAuth",
    days: int = DEFAULT_DAYS,
) -> int:
    """Sign a new key pair with ``certs``'s CA; returns the certificate's serial number.

    The pair is written beside its destination and renamed into place, key first, so a reader (the picker's
    reload) never sees a half-written file; it may briefly see the new key with the old certificate, which the
    picker detects (they do not match) and waits out.
    """
    serial = secrets.randbits(63)
    with tempfile.TemporaryDirectory(dir=cert.parent, prefix=".issue-") as tmp:
        work = Path(tmp)
        _new_key(work / "key.pem")
        extensions = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        extensions.append(f"extendedKeyUsage={usage}")
        if hosts:
            extensions.append(f"subjectAltName={_san(hosts)}")
        (work / "ext.cnf").write_text("\n".join(extensions) + "\n")
        _openssl("req", "-new", "-key", "key.pem", "-subj", f"/CN={common_name}", "-out", "req.csr", cwd=work)
        _openssl(
            "x509", "-req", "-in", "req.csr", "-CA", str(certs.ca.resolve()), "-CAkey", str(certs.ca_key.resolve()),
            "-set_serial", str(serial), "-days", str(days), "-extfile", "ext.cnf", "-out", "cert.pem",
            cwd=work,
        )  # fmt: skip
        (work / "key.pem").chmod(key.stat().st_mode & 0o777 if key.exists() else 0o600)
        (work / "key.pem").replace(key)
        (work / "cert.pem").replace(cert)
    return serial


def write_certs(
    directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = DEFAULT_DAYS, readable_keys: bool = False
) -> LocalCerts:
    """A CA, a server certificate for ``hosts`` and a client certificate, in ``directory``.

    ``readable_keys`` makes the keys readable by every user (0644): a container running as another UID than the
    files' owner (docker compose's picker runs as 10001) can then read its bind-mounted key.
    """
    if not hosts:
        raise CertsError("give at least one host name or IP address for the server certificate")
    certs = make_ca(directory, days=days)
    issue(certs, certs.server_cert, certs.server_key, hosts[0], hosts, "serverAuth", days)
    issue(certs, certs.client_cert, certs.client_key, CLIENT_NAME, (), "clientAuth", days)
    if readable_keys:
        for key in (certs.server_key, certs.client_key):
            key.chmod(0o644)
    return certs


def serial_of(cert: Path) -> int:
    """A certificate file's serial number."""
    out = _openssl("x509", "-in", str(cert), "-noout", "-serial").strip()
    return int(out.partition("=")[2], 16)


def wait_https(child: Child, url: str, tls: ClientTls, timeout: float = 20.0) -> None:
    """`Child.wait_http` for a TLS endpoint: until ``url`` answers 200 over ``tls``, or the child dies."""
    context = tls.ssl_context()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} not ready at {url} after {timeout:.0f}s:\n{child.log_tail()}")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"extproc certs: error: {out} is not empty; use --force to replace its certificates", file=sys.stderr)
        return 2
    try:
        certs = write_certs(out, args.hosts, args.days, args.readable_keys)
    except CertsError as exc:
        print(f"extproc certs: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {certs.directory}/: ca.crt ca.key, server.crt server.key ({', '.join(args.hosts)}), "
        f"client.crt client.key (CN={CLIENT_NAME})\n"
        "picker (config.yaml):\n"
        f"  server: {{tls: {{cert_file: {certs.server_cert}, key_file: {certs.server_key}, "
        f"client_ca_file: {certs.ca}}}}}\n"
        "Envoy: extproc envoy-config ... "
        f"--ext-proc-ca {certs.ca} --ext-proc-cert {certs.client_cert} --ext-proc-key {certs.client_key}\n"
        "docs/tls.md has the rest (compose, rotation)."
    )
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``extproc certs``."""
    p = sub.add_parser(
        "certs",
        help="make a local CA, a server certificate for the picker and a client certificate for Envoy",
        description="Write a local CA (ca.crt, ca.key), the picker's server certificate (server.crt, server.key; "
        "SANs from --hosts) and a client certificate (client.crt, client.key) for mTLS, for docker compose, "
        "`extproc up` and tests. In a cluster, cert-manager or OpenShift's service CA issue them (docs/tls.md).",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--out", required=True, help="directory to write the files to")
    p.add_argument(
        "--hosts", nargs="+", default=list(DEFAULT_HOSTS), help="names and IP addresses the server certificate is for"
    )
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity of every certificate")
    p.add_argument(
        "--readable-keys",
        action="store_true",
        help="make the keys readable by every user (0644), for containers running as another UID (docker compose)",
    )
    p.add_argument("--force", action="store_true", help="replace the certificates in a non-empty --out")
    p.set_defaults(func=run)
