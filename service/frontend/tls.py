"""TLS for both doors, from the PEM files the settings name: one rule (mutual TLS when a client CA is
given), in the form each door's library takes. Runs in each front-end."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Optional

import grpc

from ..settings import Settings


@dataclass(frozen=True)
class Tls:
    cert: str  # the server's certificate chain (PEM)
    key: str  # its private key (PEM)
    client_ca: str = ""  # with it, clients must present a certificate it signed

    @classmethod
    def of(cls, settings: Settings) -> Optional[Tls]:
        return cls(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls_cert else None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """The gRPC door's credentials: gRPC takes the files' contents."""

        def read(path: str) -> bytes:
            with open(path, "rb") as handle:
                return handle.read()

        return grpc.ssl_server_credentials(
            [(read(self.key), read(self.cert))],
            root_certificates=read(self.client_ca) if self.client_ca else None,
            require_client_auth=bool(self.client_ca),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTP door's context: Python's ssl takes the paths."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context
