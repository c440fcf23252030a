"""Transport security and authentication, shared by the three services and the client.

* TLS: a service given a certificate and key serves TLS; given a CA too, it requires clients to present a certificate
  signed by that CA (mutual TLS). The orchestrator uses the same files as a client of the model services, so one CA
  and one certificate per pod secure every hop.
* Bearer token: the public API can require `authorization: Bearer <token>` metadata; calls without it (or with
  another token) get UNAUTHENTICATED. Health and reflection stay open so probes and grpcurl's `list` keep working.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of one process. cert + key: serve TLS (and present them as a client); ca: verify peers with it."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
        for f in (self.cert, self.key, self.ca):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"TLS file {f} does not exist")

    @classmethod
    def from_env(cls, prefix: str = "TANDEM_TLS_") -> TlsFiles:
        def path(name: str) -> Path | None:
            value = os.environ.get(prefix + name)
            return Path(value) if value else None

        return cls(path("CERT"), path("KEY"), path("CA"))

    @property
    def serves_tls(self) -> bool:
        return self.cert is not None


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS server credentials; with a CA, client certificates signed by it are required (mTLS)."""
    assert tls.cert is not None and tls.key is not None
    ca = _read(tls.ca)
    return grpc.ssl_server_credentials(
        [(_read(tls.key), _read(tls.cert))], root_certificates=ca, require_client_auth=ca is not None
    )


def open_channel(target: str, tls: TlsFiles | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to target: plaintext without a CA; TLS verifying the server with the CA (and presenting cert/key)."""
    if tls is None or tls.ca is None:
        return grpc.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca), private_key=_read(tls.key), certificate_chain=_read(tls.cert)
    )
    return grpc.secure_channel(target, creds, options=options)


def bearer_metadata(token: str | None) -> list[tuple[str, str]]:
    """Call metadata carrying a bearer token (empty without one)."""
    return [("authorization", f"Bearer {token}")] if token else []


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls to `services` (full names) unless they carry `authorization: Bearer <token>`."""

    def __init__(self, token: str, services: Sequence[str]) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._prefixes = tuple(f"/{s}/" for s in services)

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if not details.method.startswith(self._prefixes):
            return continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        return self._deny_stream if handler is not None and handler.response_streaming else self._deny_unary


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token from a flag value or a file (the file wins; whitespace stripped)."""
    if token_file is not None:
        return Path(token_file).read_text().strip() or None
    return token or None


def add_tls_flags(parser: Any) -> None:
    """--tls-cert / --tls-key / --tls-ca on a service's argparse parser (env TANDEM_TLS_CERT / _KEY / _CA)."""
    env = os.environ.get
    parser.add_argument(
        "--tls-cert", type=Path, default=env("TANDEM_TLS_CERT") or None, help="PEM certificate: serve TLS"
    )
    parser.add_argument("--tls-key", type=Path, default=env("TANDEM_TLS_KEY") or None, help="PEM private key of it")
    parser.add_argument(
        "--tls-ca", type=Path, default=env("TANDEM_TLS_CA") or None, help="PEM CA: require client certificates (mTLS)"
    )


def tls_from_args(parser: Any, args: Any) -> TlsFiles | None:
    """The TlsFiles the flags ask for (None: plaintext); a usage error for an incomplete or missing set."""
    if args.tls_cert is None and args.tls_key is None and args.tls_ca is None:
        return None
    try:
        return TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
