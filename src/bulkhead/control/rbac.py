"""Role-based access control in Azure's model (pure: values in, decisions out).

- A role definition has `actions` and `not_actions` (patterns with `*` wildcards that match any
  characters, `/` included, as in Azure: `*/read` matches `vm/console/read`) and `assignable_scopes`.
- A role assignment binds principal + role + scope. Scopes are `/`, `/tenants/{t}` and
  `/tenants/{t}/vms/{v}`; an assignment at a scope applies to that scope and everything below it.
- A principal may do action A at scope S when SOME assignment at S or an ancestor of S has a role whose
  actions match A and whose not_actions do not (not_actions subtract from that role only; they are not
  a deny, so permissions from several assignments add up). Everything else is denied.
- Nobody can grant what they do not hold: assigning role R at scope S requires `role/assign` at S and
  every concrete action R grants at S.

Evaluation runs in pycasbin (one small enforcer per principal, built from that principal's assignments);
`PureEvaluator` is the same rule in plain Python, kept as the reference the tests cross-check against and
as the baseline of the measurement in docs/RBAC.md. Raises ConfigError for malformed scopes or patterns.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from bulkhead.errors import ConfigError

__all__ = [
    "ACTIONS",
    "BUILTIN_ROLES",
    "Assignment",
    "CasbinEvaluator",
    "Evaluator",
    "PureEvaluator",
    "RoleDef",
    "action_matches",
    "allowed_scopes",
    "granted_actions",
    "make_evaluator",
    "network_scope",
    "parse_scope",
    "scope_within",
    "tenant_scope",
    "validate_pattern",
    "validate_scope",
    "vm_scope",
]

# Every concrete action the API checks. Patterns in role definitions are matched against these.
ACTIONS: tuple[str, ...] = (
    "tenant/read",
    "tenant/write",
    "tenant/delete",
    "vm/read",
    "vm/write",
    "vm/delete",
    "vm/start",
    "vm/stop",
    "vm/pause",
    "vm/resume",
    "vm/shutdown",
    "vm/reboot",
    "vm/console/read",
    "vm/console/write",
    "vm/events/read",
    "vm/snapshot",
    "snapshot/read",
    "snapshot/restore",
    "snapshot/delete",
    "host/read",
    "host/drain",
    "disk/read",
    "disk/write",
    "disk/delete",
    "network/read",
    "network/write",
    "principal/read",
    "principal/write",
    "role/read",
    "role/write",
    "role/delete",
    "role/assign",
    "audit/read",
    "metrics/read",
    "image/read",
    "image/write",
    "image/delete",
    "integrity/policy/read",
    "integrity/policy/write",
)

_PATTERN_RE = re.compile(r"^[a-z*][a-z*/]{0,63}$")
_ID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_SCOPE_RE = re.compile(rf"^/(tenants/({_ID_RE})(/(vms|disks|networks|snapshots)/({_ID_RE}))?)?$")


@dataclass(frozen=True)
class RoleDef:
    """A role definition. `builtin` roles cannot be changed or deleted."""

    id: str
    name: str
    actions: tuple[str, ...]
    not_actions: tuple[str, ...] = ()
    assignable_scopes: tuple[str, ...] = ("/",)
    description: str = ""
    builtin: bool = False


@dataclass(frozen=True)
class Assignment:
    id: str
    principal_id: str
    role_id: str
    scope: str


# Built-in roles (ids are filled in with random UUIDs when the state store is created).
BUILTIN_ROLES: tuple[RoleDef, ...] = (
    RoleDef("", "Owner", ("*",), (), ("/",), "full access, including granting access to others", True),
    RoleDef(
        "",
        "Contributor",
        ("*",),
        ("role/write", "role/delete", "role/assign", "principal/write", "audit/read", "integrity/policy/write"),
        ("/",),
        "manage everything except access (roles, assignments, principals), the audit log and the attestation "
        "policy",
        True,
    ),
    RoleDef(
        "",
        "Reader",
        ("*/read",),
        ("vm/console/read", "audit/read"),
        ("/",),
        "read resources; no console output (it may hold guest secrets), no audit log",
        True,
    ),
    RoleDef(
        "",
        "VM Operator",
        ("vm/read", "vm/start", "vm/stop", "vm/shutdown", "vm/reboot", "vm/console/read", "vm/console/write",
         "vm/snapshot", "snapshot/read"),
        (),
        ("/",),
        "start, stop, shut down and reboot VMs, read and type into their console (and see them), snapshot "
        "them (restoring one creates a VM: Contributor)",
        True,
    ),
    RoleDef("", "Auditor", ("audit/read",), (), ("/",), "read the audit log only", True),
    RoleDef("", "Monitoring Reader", ("metrics/read",), (), ("/",), "scrape GET /metrics only", True),
)


def validate_pattern(pattern: str) -> str:
    """Check one action pattern (`vm/*`, `*/read`, `audit/read`). Raises ConfigError."""
    if not isinstance(pattern, str) or not _PATTERN_RE.match(pattern) or "//" in pattern:
        raise ConfigError(f"action pattern {pattern!r} is not valid (lowercase words, '/', '*'; max 64 chars)")
    return pattern


def validate_scope(scope: str) -> str:
    """Check a scope string: `/`, `/tenants/{uuid}`, `/tenants/{uuid}/vms/{uuid}` (or `/disks/`, `/networks/`).

    Raises ConfigError.
    """
    if not isinstance(scope, str) or not _SCOPE_RE.match(scope):
        raise ConfigError(f"scope {scope[:80]!r} is not /, /tenants/<uuid> or /tenants/<uuid>/vms/<uuid>")
    return scope


def parse_scope(scope: str) -> tuple[str | None, str | None]:
    """`/tenants/t/vms/v` -> (t, v); `/tenants/t` -> (t, None); `/` -> (None, None). Raises ConfigError."""
    m = _SCOPE_RE.match(validate_scope(scope))
    assert m is not None
    return m.group(2), m.group(5)


def tenant_scope(tenant_id: str) -> str:
    return f"/tenants/{tenant_id}"


OWNED_KINDS = ("vm", "disk", "network", "snapshot")  # tenant-owned resources: scope /tenants/{t}/{kind}s/{id}


def owned_scope(kind: str, tenant_id: str, resource_id: str) -> str:
    """The scope of a tenant-owned resource (`kind` in OWNED_KINDS)."""
    if kind not in OWNED_KINDS:
        raise ValueError(f"not a tenant-owned resource kind: {kind!r}")
    return f"/tenants/{tenant_id}/{kind}s/{resource_id}"


def vm_scope(tenant_id: str, vm_id: str) -> str:
    return owned_scope("vm", tenant_id, vm_id)


def network_scope(tenant_id: str, network_id: str) -> str:
    return owned_scope("network", tenant_id, network_id)


def scope_within(scope: str, container: str) -> bool:
    """True when `scope` is `container` or below it (`/tenants/a/vms/b` is within `/tenants/a`)."""
    if container == "/":
        return True
    return scope == container or scope.startswith(container + "/")


@lru_cache(maxsize=4096)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$")


def action_matches(action: str, patterns: str | Iterable[str]) -> bool:
    """True when `action` matches one of `patterns` (`|`-separated string or an iterable)."""
    items = patterns.split("|") if isinstance(patterns, str) else patterns
    return any(p and _pattern_regex(p).match(action) is not None for p in items)


def granted_actions(role: RoleDef) -> frozenset[str]:
    """The concrete actions (from ACTIONS) a role grants: matched by actions, not by not_actions."""
    return frozenset(
        a for a in ACTIONS if action_matches(a, role.actions) and not action_matches(a, role.not_actions)
    )


class Evaluator(Protocol):
    """Answers authorization questions for one snapshot of roles and assignments."""

    def load(self, roles: Sequence[RoleDef], assignments: Sequence[Assignment]) -> None: ...

    def allowed(self, principal_id: str, action: str, scope: str) -> bool: ...


@dataclass
class PureEvaluator:
    """The rule in plain Python (reference implementation)."""

    _roles: dict[str, RoleDef] = field(default_factory=dict)
    _by_principal: dict[str, list[Assignment]] = field(default_factory=dict)

    def load(self, roles: Sequence[RoleDef], assignments: Sequence[Assignment]) -> None:
        self._roles = {r.id: r for r in roles}
        by: dict[str, list[Assignment]] = {}
        for a in assignments:
            by.setdefault(a.principal_id, []).append(a)
        self._by_principal = by

    def allowed(self, principal_id: str, action: str, scope: str) -> bool:
        for a in self._by_principal.get(principal_id, ()):
            role = self._roles.get(a.role_id)
            if role is None or not scope_within(scope, a.scope):
                continue
            if action_matches(action, role.actions) and not action_matches(action, role.not_actions):
                return True
        return False


_CASBIN_MODEL = """
[request_definition]
r = scope, act

[policy_definition]
p = scope, act, notact

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = scopeWithin(r.scope, p.scope) && actionMatch(r.act, p.act) && !actionMatch(r.act, p.notact)
"""


def _casbin_scope_within(scope: str, container: str) -> bool:
    return scope_within(scope, container)


def _casbin_action_match(action: str, patterns: str) -> bool:
    return action_matches(action, patterns)


class CasbinEvaluator:
    """pycasbin-backed evaluation: one enforcer per principal, holding one policy line per assignment
    (scope, actions joined by `|`, not_actions joined by `|`). Enforcers are built lazily and dropped
    whenever roles or assignments change. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._roles: dict[str, RoleDef] = {}
        self._by_principal: dict[str, list[Assignment]] = {}
        self._enforcers: dict[str, object] = {}  # casbin.Enforcer (untyped)

    def load(self, roles: Sequence[RoleDef], assignments: Sequence[Assignment]) -> None:
        by: dict[str, list[Assignment]] = {}
        for a in assignments:
            by.setdefault(a.principal_id, []).append(a)
        with self._lock:
            self._roles = {r.id: r for r in roles}
            self._by_principal = by
            self._enforcers = {}

    def _enforcer(self, principal_id: str) -> object | None:
        import casbin  # imported lazily: the pure core must not pay for it unless it evaluates

        with self._lock:
            if principal_id in self._enforcers:
                return self._enforcers[principal_id]
            lines: list[list[str]] = []
            for a in self._by_principal.get(principal_id, ()):
                role = self._roles.get(a.role_id)
                if role is not None and role.actions:
                    lines.append([a.scope, "|".join(role.actions), "|".join(role.not_actions)])
            if not lines:
                return None
            model = casbin.Model()
            model.load_model_from_text(_CASBIN_MODEL)
            new: object = casbin.Enforcer(model)
            new.add_function("scopeWithin", _casbin_scope_within)  # type: ignore[attr-defined]
            new.add_function("actionMatch", _casbin_action_match)  # type: ignore[attr-defined]
            new.add_policies(lines)  # type: ignore[attr-defined]
            self._enforcers[principal_id] = new
            return new

    def allowed(self, principal_id: str, action: str, scope: str) -> bool:
        enf = self._enforcer(principal_id)
        if enf is None:
            return False
        with self._lock:  # pycasbin does not promise thread-safe enforce()
            return bool(enf.enforce(scope, action))  # type: ignore[attr-defined]


def allowed_scopes(ev: Evaluator, principal_id: str, action: str, candidate_scopes: Iterable[str]) -> list[str]:
    """Of `candidate_scopes` (the principal's assignment scopes), those where `action` is allowed.
    Everything within one of them is allowed too: this is how lists are filtered with a few checks."""
    return [s for s in set(candidate_scopes) if ev.allowed(principal_id, action, s)]


def make_evaluator(engine: str = "casbin") -> Evaluator:
    """`casbin` (default) or `pure`. Raises ConfigError for another name."""
    if engine == "casbin":
        return CasbinEvaluator()
    if engine == "pure":
        return PureEvaluator()
    raise ConfigError(f"RBAC engine must be casbin or pure, not {engine!r}")
