"""The API client used by the CLI: httpx over mTLS (client certificate) or over the local root socket.

Connection choice, first match wins: --socket / BULKHEAD_SOCKET; --cert and --key (or BULKHEAD_CERT /
BULKHEAD_KEY) with --ca (BULKHEAD_CA, default <state-dir>/ca.pem) and --url (BULKHEAD_URL, default from
<state-dir>/serve.json, else https://127.0.0.1:8443); the state directory's local socket when it exists.
Raises ConfigError when no way to connect is configured, HostError when the daemon cannot be reached.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bulkhead.errors import ConfigError, DaemonUnreachable, RefusedError

__all__ = ["ApiClient", "ClientError", "Endpoint", "client_ssl", "resolve_endpoint"]


class ClientError(RefusedError):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Endpoint:
    url: str
    socket: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None


def client_ssl(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the client certificate {cert} / key {key}: {exc}") from None
    return ctx


def resolve_endpoint(state_dir: Path, *, url: str | None = None, socket: str | None = None,
                     cert: str | None = None, key: str | None = None, ca: str | None = None) -> Endpoint:
    socket = socket or os.environ.get("BULKHEAD_SOCKET")
    if socket:
        return Endpoint("http://bulkheadd", socket=socket)
    cert = cert or os.environ.get("BULKHEAD_CERT")
    key = key or os.environ.get("BULKHEAD_KEY")
    if cert or key:
        if not (cert and key):
            raise ConfigError("--cert and --key go together")
        ca = ca or os.environ.get("BULKHEAD_CA") or str(state_dir / "ca.pem")
        url = url or os.environ.get("BULKHEAD_URL")
        if not url:
            try:
                info = json.loads((state_dir / "serve.json").read_text())
                url = f"https://{info['host']}:{info['port']}"
            except (OSError, ValueError, KeyError):
                url = "https://127.0.0.1:8443"
        return Endpoint(url, cert=cert, key=key, ca=ca)
    sock = state_dir / "bulkhead.sock"
    if sock.exists():
        return Endpoint("http://bulkheadd", socket=str(sock))
    raise DaemonUnreachable(
        f"no daemon to reach: tried the local socket {sock} (absent: is bulkheadd running with --state-dir "
        f"{state_dir}? `systemctl status bulkhead`), and no --cert/--key (mTLS) or --socket was given"
    )


class ApiClient:
    def __init__(self, ep: Endpoint, timeout: float = 30.0) -> None:
        self.endpoint = ep
        if ep.socket:
            self._http = httpx.Client(transport=httpx.HTTPTransport(uds=ep.socket), base_url=ep.url, timeout=timeout)
        else:
            assert ep.ca and ep.cert and ep.key
            self._http = httpx.Client(base_url=ep.url, verify=client_ssl(ep.ca, ep.cert, ep.key), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        """One request. Returns the decoded JSON (None for 204). Raises ClientError for API errors,
        HostError when the daemon cannot be reached."""
        try:
            resp = self._http.request(method, "/v1" + path, json=body,
                                      params={k: v for k, v in (params or {}).items() if v is not None},
                                      timeout=timeout if timeout is not None else self._http.timeout)
        except (httpx.TransportError, ssl.SSLError, OSError) as exc:
            where = f"the local socket {self.endpoint.socket}" if self.endpoint.socket else self.endpoint.url
            raise DaemonUnreachable(f"cannot reach the daemon at {where}: {exc}") from None
        if resp.status_code == 204:
            return None
        try:
            data = resp.json()
        except ValueError:
            data = {"detail": resp.text[:200]}
        if resp.status_code >= 400:
            detail = data.get("detail", data) if isinstance(data, dict) else data
            raise ClientError(resp.status_code, detail)
        return data

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)
