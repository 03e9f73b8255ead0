"""The fleet's etcd layer: one small client over etcd's v3 JSON gateway (etcd3gw 2.7.0 for transport).

docs/FLEET.md "Client choice" says why etcd3gw. This module adds what the fleet needs on top of it:
several endpoints with fail-over (a member that is down is skipped), mutual TLS, transactions with
revision, lease and existence comparisons (the fencing tokens), leases with keepalive. Every failure to
reach a quorum becomes HostError; a refused transaction is a False result, never an exception.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bulkhead.errors import ConfigError, HostError

__all__ = ["Cmp", "EtcdRefused", "EtcdStore", "Kv", "Op", "parse_endpoints"]


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str | None) -> str:
    return base64.b64decode(s or "").decode("utf-8", errors="replace")


def _prefix_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b).decode()


def parse_endpoints(text: str) -> list[tuple[str, str, int]]:
    """"https://h:p[,https://h:p...]" -> [(scheme, host, port)]. Raises ConfigError."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        u = urlsplit(part if "://" in part else "https://" + part)
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
            raise ConfigError(f"etcd endpoint {part!r}: expected https://HOST:PORT")
        try:
            port = u.port or 2379
        except ValueError:
            raise ConfigError(f"etcd endpoint {part!r}: bad port") from None
        out.append((u.scheme, u.hostname, port))
    if not out:
        raise ConfigError("no etcd endpoint given")
    return out


class EtcdRefused(HostError):
    """etcd answered and refused the request; `reason` is its own message."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"etcd refused {path}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Kv:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class Cmp:
    """A transaction comparison: target is MOD | CREATE | VALUE | LEASE; `create_revision 0` = absent."""

    key: str
    target: str
    value: int | str

    def to_json(self, ns: str = "") -> dict[str, Any]:
        field = {"MOD": "mod_revision", "CREATE": "create_revision", "VALUE": "value", "LEASE": "lease"}[self.target]
        v: Any = _b64(str(self.value)) if self.target == "VALUE" else str(self.value)
        return {"key": _b64(ns + self.key), "target": self.target, "result": "EQUAL", field: v}


@dataclass(frozen=True)
class Op:
    """A transaction operation: put (value, lease) or delete (value None)."""

    key: str
    value: str | None = None
    lease: int = 0

    def to_json(self, ns: str = "") -> dict[str, Any]:
        if self.value is None:
            return {"request_delete_range": {"key": _b64(ns + self.key)}}
        body: dict[str, Any] = {"key": _b64(ns + self.key), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return {"request_put": body}


class EtcdStore:
    """A fleet member's connection to etcd. Thread-safe (each call is one HTTP request)."""

    def __init__(self, endpoints: str | Sequence[str], tls: Any = None, timeout: float = 2.0,
                 namespace: str = "", user: str | None = None, password: str | None = None) -> None:
        """`namespace`: a key prefix put before every key (several fleets, or tests, on one etcd).
        `user`/`password`: an etcd user (docs/FLEET.md "etcd access control"); its token goes in every
        request's Authorization header and is renewed when etcd says it is no longer valid."""
        if namespace and (not namespace.startswith("/") or namespace.endswith("/")):
            raise ConfigError("an etcd namespace starts with '/' and does not end with one")
        self.ns = namespace
        import requests
        from etcd3gw.client import Etcd3Client

        eps = parse_endpoints(endpoints if isinstance(endpoints, str) else ",".join(endpoints))
        self.clients = []
        for scheme, host, port in eps:
            if scheme == "https" and tls is None:
                raise ConfigError("https etcd endpoints need --etcd-ca, --etcd-cert and --etcd-key")
            session = requests.Session()
            # never the environment's CA bundle or proxies: REQUESTS_CA_BUNDLE would silently replace
            # the fleet CA (requests prefers it over session.verify), a proxy would sit in the middle
            session.trust_env = False
            if tls is not None:
                session.verify = tls.ca
                session.cert = (tls.cert, tls.key)
            self.clients.append(Etcd3Client(host=host, port=port, protocol=scheme, timeout=timeout,
                                            api_path="/v3/", session=session))
        self._cur = 0
        self._lock = threading.Lock()
        self.user, self._password = user, password
        self._token = ""

    def _authenticate(self) -> None:
        out = self._post("/auth/authenticate", {"name": self.user, "password": self._password}, auth=False)
        token = str(out.get("token") or "")
        if not token:
            raise HostError(f"etcd gave user {self.user!r} no token")
        self._token = token

    def _post(self, path: str, body: dict[str, Any], auth: bool = True) -> dict[str, Any]:
        if not auth or self.user is None:
            return self._post_once(path, body, None)
        if not self._token:
            self._authenticate()
        try:
            return self._post_once(path, body, self._token)
        except EtcdRefused as exc:
            if "invalid auth token" not in exc.reason:
                raise
        self._authenticate()  # simple tokens expire when idle, and with a member's restart
        return self._post_once(path, body, self._token)

    def _post_once(self, path: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        from etcd3gw import exceptions as ex

        headers = {"Authorization": token} if token else None
        errors = []
        with self._lock:
            start = self._cur
        for k in range(len(self.clients)):
            i = (start + k) % len(self.clients)
            c = self.clients[i]
            try:
                out = c.post(c.get_url(path), json=body, headers=headers)
            except (ex.ConnectionFailedError, ex.ConnectionTimeoutError, ex.InternalServerError) as exc:
                errors.append(f"{c.host}:{c.port}: {type(exc).__name__} {str(exc)[:160]}")
                continue
            except ex.Etcd3Exception as exc:
                detail = getattr(exc, "detail_text", None) or str(exc)
                raise EtcdRefused(path, str(detail)[:300]) from None
            except OSError as exc:
                errors.append(f"{c.host}:{c.port}: {exc}")
                continue
            with self._lock:
                self._cur = i
            return out if isinstance(out, dict) else {}
        raise HostError("etcd is unreachable: " + "; ".join(errors))

    # ---- keys ------------------------------------------------------------------------------------
    def _kvs(self, out: dict[str, Any]) -> list[Kv]:
        n = len(self.ns)
        return [Kv(_unb64(k.get("key"))[n:], _unb64(k.get("value")), int(k.get("create_revision", 0)),
                   int(k.get("mod_revision", 0)), int(k.get("lease", 0))) for k in out.get("kvs", [])]

    def get(self, key: str) -> Kv | None:
        kvs = self._kvs(self._post("/kv/range", {"key": _b64(self.ns + key)}))
        return kvs[0] if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[Kv], int]:
        """Every key under `prefix` and the store revision the read saw (one consistent snapshot)."""
        prefix = self.ns + prefix
        out = self._post("/kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})
        return self._kvs(out), int(out.get("header", {}).get("revision", 0))

    def put(self, key: str, value: str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(self.ns + key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._post("/kv/put", body).get("header", {}).get("revision", 0))

    def delete(self, key: str) -> int:
        return int(self._post("/kv/deleterange", {"key": _b64(self.ns + key)}).get("deleted", 0))

    def txn(self, compare: Sequence[Cmp], success: Sequence[Op], failure: Sequence[Op] = ()) -> tuple[bool, int]:
        """All comparisons hold -> apply `success`, else `failure`. Returns (succeeded, revision)."""
        ns = self.ns
        out = self._post("/kv/txn", {"compare": [c.to_json(ns) for c in compare],
                                     "success": [o.to_json(ns) for o in success],
                                     "failure": [o.to_json(ns) for o in failure]})
        return bool(out.get("succeeded", False)), int(out.get("header", {}).get("revision", 0))

    def auth(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call of etcd's auth API (/v3/auth/OP: user/add, role/grant, enable ...): needs the root role."""
        return self._post(f"/auth/{op}", body)

    def raw_key(self, key: str) -> str:
        """base64 of `key` in this store's namespace, as etcd's permissions name keys."""
        return _b64(self.ns + key)

    def raw_prefix_end(self, prefix: str) -> str:
        return _b64(_prefix_end(self.ns + prefix))

    # ---- leases ----------------------------------------------------------------------------------
    def grant(self, ttl: int) -> int:
        out = self._post("/lease/grant", {"TTL": int(ttl), "ID": 0})
        lease = int(out.get("ID", 0))
        if not lease:
            raise HostError(f"etcd granted no lease: {out.get('error', out)}")
        return lease

    def keepalive(self, lease: int) -> int:
        """Renew `lease`; returns its new TTL, 0 when etcd no longer knows it (expired or revoked)."""
        out = self._post("/lease/keepalive", {"ID": str(lease)})
        res = out.get("result", out)
        return int(res.get("TTL", 0) or 0)

    def revoke(self, lease: int) -> None:
        try:
            self._post("/lease/revoke", {"ID": str(lease)})
        except EtcdRefused as exc:
            if "not found" not in exc.reason:  # already expired or revoked: the same outcome
                raise
