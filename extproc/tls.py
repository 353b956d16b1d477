"""TLS for the picker's own ports: the ext_proc gRPC server and the metrics endpoint, from ``server.tls``.

Envoy Gateway reaches the picker over the cluster network, so that hop is encrypted (and, with ``client_ca_file``,
mutually authenticated) when ``server.tls`` is set; plaintext stays the default for the sidecar and localhost.

The files are checked once at start (every problem named by its field, with the fix) and then re-read whenever
they change, because cert-manager and OpenShift's service CA rotate them in place (a Kubernetes Secret volume swaps
a symlink). A change is taken only once the certificate, the key and the CA read back consistent (the key matches
the certificate, nothing moved while reading), so a rotation caught halfway keeps the previous pair until the
other half lands. Only new connections use the new pair: a TLS session is never renegotiated, so streams in
flight on an existing connection are untouched.

- gRPC: ``grpc.dynamic_ssl_server_credentials``, whose fetcher gRPC calls before every new handshake; it costs a
  ``stat`` per file when nothing changed.
- metrics: a threaded HTTP server that wraps each accepted connection with the current ``ssl.SSLContext``, in the
  connection's own thread, so a slow or failing handshake never blocks the accept loop.

`ClientTls` is the other end (Envoy's ext_proc cluster, probes, tests): the CA that signs the picker's certificate,
the name to verify, and an optional client certificate. ``python -m extproc.tls`` is a gRPC health probe over TLS,
for containers whose gRPC port the kubelet's plaintext ``grpc`` probe cannot reach.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from extproc.config import ServerTls

log = logging.getLogger("extproc.tls")

FIELD = "server.tls"
HANDSHAKE_TIMEOUT = 10.0  # seconds a metrics client gets to finish its TLS handshake and send the request

_CERT_MARK = b"-----BEGIN CERTIFICATE-----"


def _config_error(message: str) -> Exception:
    from extproc.config import ConfigError  # the config module costs pydantic: only when there is an error

    return ConfigError(message)


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent read of the files: PEM bytes for gRPC and the equivalent server context for HTTPS."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext
    generation: int  # 1 at start, +1 for every change taken


class _Inconsistent(Exception):
    """The files changed while being read (a rotation in progress): try again later."""


def _no_password() -> bytes:
    raise ValueError("encrypted")


class CertificateFiles:
    """The ``server.tls`` files: checked at start, re-read when their ``stat`` changes, shared by both servers.

    Thread-safe: gRPC calls `refresh` from its own threads, the metrics server from one thread per connection.
    """

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None = None) -> None:
        self.files = {"cert_file": cert_file, "key_file": key_file}
        if client_ca_file is not None:
            self.files["client_ca_file"] = client_ca_file
        self._lock = threading.Lock()
        self._signature: tuple[Any, ...] | None = None
        self._failed: tuple[Any, ...] | None = None  # a new signature that did not load, logged once
        self.current = self._load_at_start()

    @classmethod
    def from_config(cls, tls: ServerTls) -> CertificateFiles:
        """Raises ConfigError naming each bad ``server.tls`` field and its fix."""
        return cls(tls.cert_file, tls.key_file, tls.client_ca_file)

    @property
    def mutual(self) -> bool:
        return "client_ca_file" in self.files

    def _stat(self) -> tuple[Any, ...]:
        out = []
        for path in self.files.values():
            try:
                st = os.stat(path)  # follows symlinks: a Secret volume's ..data swap changes the inode
                out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError as exc:
                out.append(exc.errno)
        return tuple(out)

    def _load_at_start(self) -> TlsMaterial:
        problems = self._check_files()
        if problems:
            raise _config_error("invalid TLS configuration:\n" + "\n".join(f"  {p}" for p in problems))
        for _ in range(20):  # a rotation racing the start: each attempt re-reads everything
            signature = self._stat()
            try:
                material = self._read(generation=1)
            except _Inconsistent:
                continue
            except ValueError as exc:
                raise _config_error(f"invalid TLS configuration:\n  {exc}") from None
            self._signature = signature
            log.info("TLS: serving %s%s", self.describe(), " (clients need a certificate)" if self.mutual else "")
            return material
        raise _config_error(f"{FIELD}: the files kept changing while being read; start again once they settle")

    def refresh(self) -> TlsMaterial:
        """The current material, re-read first if any file changed; a change that does not load keeps the old."""
        signature = self._stat()
        if signature == self._signature:
            return self.current
        with self._lock:
            if signature == self._signature:
                return self.current
            try:
                material = self._read(self.current.generation + 1)
            except _Inconsistent:
                return self.current
            except (ValueError, OSError) as exc:
                if signature != self._failed:  # log a bad new set once, not on every connection
                    self._failed = signature
                    log.warning("TLS: keeping the previous certificate: %s", exc)
                return self.current
            self._signature, self.current = signature, material
            log.info("TLS: certificate files changed; new connections get %s", self.describe())
            return material

    def describe(self) -> str:
        """The certificate's subject, serial and expiry when the ssl module can tell (for the log); warns when the
        certificate has expired, which clients will refuse (the renewal did not happen or did not reach this pod)."""
        try:
            info = ssl._ssl._test_decode_cert(self.files["cert_file"])  # type: ignore[attr-defined]
            expired = ssl.cert_time_to_seconds(info["notAfter"]) < time.time()
        except Exception:  # a private helper of the ssl module: the log line is all that depends on it
            return self.files["cert_file"]
        if expired:
            log.warning("TLS: %s expired on %s: clients will refuse it", self.files["cert_file"], info["notAfter"])
        subject = ", ".join(f"{k}={v}" for rdn in info.get("subject", ()) for k, v in rdn)
        return f"{self.files['cert_file']} ({subject}, serial {info.get('serialNumber')}, until {info.get('notAfter')})"

    def _check_files(self) -> list[str]:
        """Each missing, unreadable or non-PEM file, by field; empty if every file is readable PEM."""
        problems = []
        for field, path in self.files.items():
            where = f"{FIELD}.{field}: {path}"
            what = "the private key" if field == "key_file" else "the certificate"
            if not os.path.exists(path):
                problems.append(
                    f"{where} does not exist: mount {what} there (e.g. a Secret volume) or correct the path"
                )
                continue
            if os.path.isdir(path):
                problems.append(f"{where} is a directory: name the PEM file inside it (e.g. {path}/tls.crt)")
                continue
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                problems.append(
                    f"{where} cannot be read by this process (uid {os.getuid()}): {exc.strerror}; make it "
                    "readable (a Secret volume's defaultMode, the pod's fsGroup, or the file's mode)"
                )
                continue
            if field == "key_file":
                if b"ENCRYPTED" in data:
                    problems.append(
                        f"{where} is encrypted: give an unencrypted PEM key (openssl pkey -in KEY -out NEW)"
                    )
                elif b"PRIVATE KEY-----" not in data:
                    problems.append(f"{where} holds no PEM private key ('-----BEGIN ... PRIVATE KEY-----')")
            elif _CERT_MARK not in data:
                problems.append(f"{where} holds no PEM certificate ('-----BEGIN CERTIFICATE-----')")
        return problems

    def _read(self, generation: int) -> TlsMaterial:
        """Read and check the files; raise _Inconsistent if they moved meanwhile, ValueError naming the bad field."""
        before = {field: Path(path).read_bytes() for field, path in self.files.items()}
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:  # parses the certificate (chain) alone, so its errors name cert_file, not the key
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=before["cert_file"].decode("ascii"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(
                f"{FIELD}.cert_file: {self.files['cert_file']} is not a valid PEM certificate: {exc}"
            ) from None
        try:
            context.load_cert_chain(self.files["cert_file"], self.files["key_file"], password=_no_password)
        except (ssl.SSLError, ValueError) as exc:
            if _now(self.files) != before:
                raise _Inconsistent from None
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise ValueError(
                    f"{FIELD}.key_file: {self.files['key_file']} is not the key of the certificate in "
                    f"{FIELD}.cert_file ({self.files['cert_file']}): give the key the certificate was issued for "
                    "(tls.key beside tls.crt)"
                ) from None
            raise ValueError(f"{FIELD}.key_file: {self.files['key_file']} is not a usable private key: {exc}") from None
        client_ca = before.get("client_ca_file")
        if client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.files["client_ca_file"])
            except ssl.SSLError as exc:
                raise ValueError(
                    f"{FIELD}.client_ca_file: {self.files['client_ca_file']} holds no usable CA certificate: {exc}"
                ) from None
            context.verify_mode = ssl.CERT_REQUIRED
        if _now(self.files) != before:
            raise _Inconsistent
        return TlsMaterial(before["cert_file"], before["key_file"], client_ca, context, generation)


def _now(files: dict[str, str]) -> dict[str, bytes]:
    return {field: Path(path).read_bytes() for field, path in files.items()}


def grpc_server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """Server credentials whose certificate follows the files: gRPC asks before each new handshake."""
    import grpc

    def configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.client_ca)

    served = files.current.generation

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal served
        try:
            material = files.refresh()
            if material.generation == served:
                return None  # None: keep the configuration gRPC has
            served = material.generation
            return configuration(material)
        except Exception:  # never let an exception into gRPC's handshake path
            log.exception("TLS: certificate refresh failed; keeping the previous certificate")
            return None

    return grpc.dynamic_ssl_server_credentials(
        configuration(files.current), fetch, require_client_authentication=files.mutual
    )


def serve_https(host: str, port: int, app: Callable[..., Any], files: CertificateFiles) -> Any:
    """Serve the WSGI ``app`` (the metrics) over TLS on a daemon thread; returns the server (``shutdown()``)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """No access log: Prometheus scrapes every few seconds."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def finish_request(self, request: Any, client_address: Any) -> None:
            # In the connection's thread: the handshake (and any failure) never holds up accept().
            request.settimeout(HANDSHAKE_TIMEOUT)
            try:
                tls = files.refresh().context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.debug("metrics: TLS handshake from %s failed: %s", client_address, exc)
                return
            try:
                super().finish_request(tls, client_address)
            finally:
                with contextlib.suppress(OSError):
                    tls.close()

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("metrics: error serving %s", client_address, exc_info=True)

    httpd = make_server(host, port, app, Server, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics-https", daemon=True).start()
    return httpd


# ----- the client side: Envoy's ext_proc cluster, probes, tests ----------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """How a client reaches a TLS picker: the CA that signed its certificate, the name to verify (and send as SNI),
    and for mTLS a client certificate and key. Paths, so Envoy reads the same files."""

    ca_file: str
    server_name: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both its certificate file and its key file")

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS to the metrics port (Python's ssl)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def grpc_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> Any:
        """A secure gRPC channel to ``address``, verifying ``server_name`` (default: the address's host)."""
        import grpc

        key = Path(self.key_file).read_bytes() if self.key_file else None
        cert = Path(self.cert_file).read_bytes() if self.cert_file else None
        credentials = grpc.ssl_channel_credentials(Path(self.ca_file).read_bytes(), key, cert)
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(address, credentials, options=[*extra, *options])


def health_check(address: str, service: str, tls: ClientTls | None, timeout: float = 2.0) -> bool:
    """Whether the picker at ``address`` reports ``service`` SERVING over gRPC health (TLS when ``tls`` is given)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = tls.grpc_channel(address) if tls is not None else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"health {service} at {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m extproc.tls [--ca FILE [--server-name N] [--cert F --key F]] ADDRESS SERVICE``: exit 0 if SERVING."""
    p = argparse.ArgumentParser(prog="python -m extproc.tls", description="gRPC health probe of the picker, over TLS")
    p.add_argument("address", help="host:port of the picker's gRPC port, e.g. 127.0.0.1:9002")
    p.add_argument("service", help="health service: readiness or liveness")
    p.add_argument("--ca", help="CA of the picker's certificate (without: plaintext)")
    p.add_argument("--server-name", help="name to verify in the picker's certificate (default: the address's host)")
    p.add_argument("--cert", help="client certificate, when the picker requires one (server.tls.client_ca_file)")
    p.add_argument("--key", help="the client certificate's key")
    p.add_argument("--timeout", type=float, default=2.0)
    args = p.parse_args(argv)
    tls = ClientTls(args.ca, args.server_name, args.cert, args.key) if args.ca else None
    return 0 if health_check(args.address, args.service, tls, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
