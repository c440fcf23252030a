"""Mutual TLS between all services and bearer-token auth on the public API, with a CA the test generates."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import SPECULATE_ALWAYS, TINY, make_engine
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.server import OrchestratorServiceConfig, parse_args
from orchestrator.server import build_server as build_orchestrator
from primary_svc.server import PrimaryServiceConfig
from primary_svc.server import build_server as build_primary
from secondary_svc.server import SecondaryServiceConfig
from secondary_svc.server import build_server as build_secondary
from tandem.config import SpecConfig
from tandem.decoding.workers import DrafterWorker, PrimaryWorker
from tandemrpc.client import TandemClient
from tandemrpc.security import TlsFiles, open_channel
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert, _write(directory / name, key, cert)[0]


def issue(directory: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]) -> TlsFiles:
    """A leaf certificate for 127.0.0.1 / localhost (server and client use), signed by `ca`."""
    ca_key, ca_cert, ca_path = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = _write(directory / name, key, cert)
    return TlsFiles(cert_path, key_path, ca_path)


class SecureStack:
    """Primary, Secondary and Orchestrator with mutual TLS on every hop and a bearer token on the public API."""

    def __init__(self, tiny_params, directory: Path) -> None:
        self.ca = make_ca(directory, "tandem-ca")
        self.rogue_ca = make_ca(directory, "rogue-ca")
        tls = {n: issue(directory, n, self.ca) for n in ("primary", "secondary", "orchestrator", "client")}
        self.tls = tls
        served = make_engine(tiny_params, max_len=256, slots=2)
        self.reference = make_engine(tiny_params, max_len=256)
        drafters = {
            "tandem": DrafterWorker(served.drafters["tandem-speed"].runner),
            "vanilla": DrafterWorker(served.drafters["speed"].runner),
        }
        self.primary = build_primary(PrimaryWorker(served.primary), PrimaryServiceConfig(tls=tls["primary"])).start()
        self.secondary = build_secondary(drafters, SecondaryServiceConfig(tls=tls["secondary"])).start()
        core = OrchestratorConfig(
            payoff=SPECULATE_ALWAYS,
            primary_target=self.primary.address,
            secondary_target=self.secondary.address,
            vocab_size=TINY.vocab_size,
            max_len=256,
            default_spec=SpecConfig(gamma_max=4, tau=0.0),
            tls=tls["orchestrator"],
        )
        cfg = OrchestratorServiceConfig(core=core, tls=tls["orchestrator"], auth_token=TOKEN)
        self.orchestrator, self.core = build_orchestrator(cfg, None)
        self.orchestrator.start()

    def close(self) -> None:
        for s in (self.orchestrator, self.secondary, self.primary):
            s.stop(0)
        self.core.close()


@pytest.fixture(scope="module")
def stack(tiny_params, tmp_path_factory) -> Iterator[SecureStack]:
    s = SecureStack(tiny_params, tmp_path_factory.mktemp("pki"))
    yield s
    s.close()


def _generate(client: TandemClient, prompt: list[int]) -> list[int]:
    return [t for c in client.generate(prompt, mode="tandem-speed", max_tokens=24) for t in c.token_ids]


def test_mutual_tls_and_token_end_to_end(stack: SecureStack) -> None:
    prompt = [3, 17, 9]
    want = stack.reference.generate(prompt, mode="primary", max_tokens=24).token_ids
    with TandemClient(stack.orchestrator.address, timeout_s=30, token=TOKEN, tls=stack.tls["client"]) as client:
        assert _generate(client, prompt) == want


def test_public_api_without_or_with_a_wrong_token_is_unauthenticated(stack: SecureStack) -> None:
    for token in (None, "wrong"):
        with TandemClient(stack.orchestrator.address, timeout_s=30, token=token, tls=stack.tls["client"]) as client:
            with pytest.raises(grpc.RpcError) as err:
                _generate(client, [1, 2, 3])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
            assert "bearer token" in err.value.details()
    # health stays reachable (probes), with a client certificate
    with open_channel(stack.orchestrator.address, stack.tls["client"]) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", ["primary", "secondary", "orchestrator"])
def test_no_service_is_reachable_without_a_valid_client_certificate(stack: SecureStack, tmp_path, service) -> None:
    server = getattr(stack, service)
    ca_path = stack.tls["client"].ca
    no_cert = TlsFiles(ca=ca_path)  # verifies the server, presents nothing
    rogue = issue(tmp_path, "rogue", stack.rogue_ca)  # a certificate from another CA
    rogue = TlsFiles(rogue.cert, rogue.key, ca_path)
    for tls in (None, no_cert, rogue):
        with open_channel(server.address, tls) as channel:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (service, tls)
    if service == "primary":  # and the model API itself
        with open_channel(server.address, no_cert) as channel, pytest.raises(grpc.RpcError):
            pb_grpc.PrimaryStub(channel).Release(pb.ReleaseRequest(session_id="x"), timeout=5)


def test_flags_and_environment(tmp_path, monkeypatch, stack: SecureStack) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    files = stack.tls["orchestrator"]
    cfg, _ = parse_args(
        ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca),
         "--auth-token-file", str(token_file)]
    )  # fmt: skip
    assert cfg.tls == files and cfg.core.tls == files and cfg.auth_token == TOKEN
    monkeypatch.setenv("TANDEM_AUTH_TOKEN", "from-env")
    assert parse_args([])[0].auth_token == "from-env"
    with pytest.raises(SystemExit):
        parse_args(["--tls-cert", str(files.cert)])  # a certificate without its key
