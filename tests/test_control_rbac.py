"""RBAC: the full authorization matrix (built-in role x action x target scope x assignment level), generated
from the role definitions and checked against a hand-written expectation table; casbin vs the reference
evaluator; wildcard and scope semantics."""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.control import rbac
from bulkhead.control.rbac import ACTIONS, BUILTIN_ROLES, Assignment, RoleDef
from bulkhead.errors import ConfigError

ALL = set(ACTIONS)
# Hand-written: what each built-in role must grant (written out, not derived from the patterns).
EXPECTED_GRANTS: dict[str, set[str]] = {
    "Owner": ALL,
    "Contributor": ALL - {"role/write", "role/delete", "role/assign", "principal/write", "audit/read",
                          "integrity/policy/write"},
    "Reader": {"tenant/read", "vm/read", "vm/events/read", "disk/read", "network/read", "principal/read",
               "role/read", "metrics/read", "image/read", "integrity/policy/read", "host/read",
               "snapshot/read"},
    "VM Operator": {"vm/read", "vm/start", "vm/stop", "vm/shutdown", "vm/reboot", "vm/console/read",
                    "vm/console/write", "vm/snapshot", "snapshot/read"},
    "Auditor": {"audit/read"},
    "Monitoring Reader": {"metrics/read"},
}

# Fixed ids (not uuid4 at import): parametrized test ids must be the same in every collection (pytest-xdist)
T, U = (str(uuid.UUID(int=0x7E0A_0001 + i)) for i in range(2))
V1, V2, UV = (str(uuid.UUID(int=0x7E0B_0001 + i)) for i in range(3))
N, UN = (str(uuid.UUID(int=0x7E0C_0001 + i)) for i in range(2))
S, US = (str(uuid.UUID(int=0x7E0D_0001 + i)) for i in range(2))
TARGETS = {
    "own VM": f"/tenants/{T}/vms/{V1}",
    "other VM, own tenant": f"/tenants/{T}/vms/{V2}",
    "own tenant": f"/tenants/{T}",
    "network of own tenant": f"/tenants/{T}/networks/{N}",
    "other tenant": f"/tenants/{U}",
    "VM of other tenant": f"/tenants/{U}/vms/{UV}",
    "network of other tenant": f"/tenants/{U}/networks/{UN}",
    "snapshot of own tenant": f"/tenants/{T}/snapshots/{S}",
    "snapshot of other tenant": f"/tenants/{U}/snapshots/{US}",
    "root": "/",
}
LEVELS = {"vm": f"/tenants/{T}/vms/{V1}", "tenant": f"/tenants/{T}", "root": "/"}
# Hand-written: which targets an assignment at each level reaches.
REACH = {
    "vm": {"own VM"},
    "tenant": {"own VM", "other VM, own tenant", "own tenant", "network of own tenant", "snapshot of own tenant"},
    "root": set(TARGETS),
}


def _roles() -> list[RoleDef]:
    return [RoleDef(str(uuid.uuid4()), r.name, r.actions, r.not_actions, r.assignable_scopes, "", True)
            for r in BUILTIN_ROLES]


def test_every_builtin_role_has_an_expectation():
    assert {r.name for r in BUILTIN_ROLES} == set(EXPECTED_GRANTS)


@pytest.mark.parametrize("role", BUILTIN_ROLES, ids=lambda r: r.name)
def test_granted_actions_match_the_table(role):
    assert rbac.granted_actions(role) == EXPECTED_GRANTS[role.name]


@pytest.mark.parametrize("engine", ["casbin", "pure"])
def test_full_authorization_matrix(engine):
    roles = _roles()
    by_name = {r.name: r for r in roles}
    failures = []
    cases = 0
    for role_name, (level, level_scope) in itertools.product(EXPECTED_GRANTS, LEVELS.items()):
        ev = rbac.make_evaluator(engine)
        ev.load(roles, [Assignment("a", "p", by_name[role_name].id, level_scope)])
        for action, (target, scope) in itertools.product(ACTIONS, TARGETS.items()):
            want = action in EXPECTED_GRANTS[role_name] and target in REACH[level]
            got = ev.allowed("p", action, scope)
            cases += 1
            if got != want:
                failures.append((role_name, level, action, target, got))
            # another principal never inherits anything
            assert not ev.allowed("someone-else", action, scope)
    assert cases == len(EXPECTED_GRANTS) * len(LEVELS) * len(ACTIONS) * len(TARGETS)
    assert not failures, failures[:10]


@pytest.mark.parametrize("engine", ["casbin", "pure"])
def test_permissions_add_up_and_not_actions_are_not_denies(engine):
    roles = _roles()
    by = {r.name: r.id for r in roles}
    ev = rbac.make_evaluator(engine)
    ev.load(roles, [
        Assignment("1", "p", by["Reader"], TARGETS["own tenant"]),
        Assignment("2", "p", by["VM Operator"], TARGETS["own VM"]),
    ])
    assert ev.allowed("p", "vm/start", TARGETS["own VM"])
    assert not ev.allowed("p", "vm/start", TARGETS["other VM, own tenant"])
    assert ev.allowed("p", "vm/read", TARGETS["other VM, own tenant"])
    # Reader's notActions exclude console; the VM Operator grant adds it back for its own VM only
    assert ev.allowed("p", "vm/console/read", TARGETS["own VM"])
    assert not ev.allowed("p", "vm/console/read", TARGETS["other VM, own tenant"])
    assert not ev.allowed("p", "vm/delete", TARGETS["own VM"])


def test_no_assignment_means_deny():
    ev = rbac.make_evaluator("casbin")
    ev.load(_roles(), [])
    assert not any(ev.allowed("p", a, s) for a in ACTIONS for s in TARGETS.values())


def test_wildcards_match_across_slashes_like_azure():
    assert rbac.action_matches("vm/console/read", ["*/read"])
    assert rbac.action_matches("vm/console/read", ["vm/*"])
    assert not rbac.action_matches("vm/start", ["*/read"])
    assert not rbac.action_matches("vmx/read", ["vm/read"])
    assert rbac.action_matches("audit/read", "tenant/read|audit/*")


def test_scope_within_is_not_a_string_prefix():
    t = TARGETS["own tenant"]
    assert rbac.scope_within(t + "/vms/" + V1, t)
    assert not rbac.scope_within(t + "x", t)  # /tenants/abc vs /tenants/abcx
    assert rbac.scope_within("/anything", "/")
    assert not rbac.scope_within("/", t)


@pytest.mark.parametrize("bad", ["", "tenants", "/tenants/x", f"/tenants/{T}/", f"/tenants/{T}/vms",
                                 f"/tenants/{T}/nets/{V1}", "/../", f"/tenants/{T.upper()}"])
def test_bad_scopes_raise_config_error(bad):
    with pytest.raises(ConfigError, match="is not /, /tenants/<uuid> or /tenants/<uuid>/vms/<uuid>"):
        rbac.validate_scope(bad)


@pytest.mark.parametrize("bad", ["", "VM/read", "vm//read", "vm/read;", "x" * 65, "vm read"])
def test_bad_patterns_raise_config_error(bad):
    with pytest.raises(ConfigError, match="action pattern"):
        rbac.validate_pattern(bad)


def test_parse_scope():
    assert rbac.parse_scope("/") == (None, None)
    assert rbac.parse_scope(TARGETS["own VM"]) == (T, V1)
    assert rbac.parse_scope(TARGETS["own tenant"]) == (T, None)


def test_unknown_engine_is_a_config_error():
    with pytest.raises(ConfigError, match="RBAC engine must be casbin or pure, not 'opa'"):
        rbac.make_evaluator("opa")


_pattern = st.sampled_from(["*", "*/read", "vm/*", "vm/read", "vm/start", "audit/read", "role/*", "disk/*",
                            "tenant/read", "vm/console/read", "*/write", "principal/*"])
_scope = st.sampled_from(list(TARGETS.values()))


@settings(max_examples=150, deadline=None)
@given(
    roles=st.lists(st.tuples(st.lists(_pattern, min_size=1, max_size=3), st.lists(_pattern, max_size=2)),
                   min_size=1, max_size=4),
    grants=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), _scope), max_size=5),
    queries=st.lists(st.tuples(st.integers(0, 1), st.sampled_from(ACTIONS), _scope), min_size=1, max_size=10),
)
def test_casbin_agrees_with_the_reference_evaluator(roles, grants, queries):
    defs = [RoleDef(f"r{i}", f"r{i}", tuple(a), tuple(n)) for i, (a, n) in enumerate(roles)]
    asg = [Assignment(str(k), f"p{p}", f"r{r % len(defs)}", s) for k, (r, p, s) in enumerate(grants)]
    cas, pure = rbac.CasbinEvaluator(), rbac.PureEvaluator()
    cas.load(defs, asg)
    pure.load(defs, asg)
    for p, action, scope in queries:
        assert cas.allowed(f"p{p}", action, scope) == pure.allowed(f"p{p}", action, scope)


# --- mutation-testing survivors (issue 15): scope builders, pattern validation, dangling assignments ----

def test_owned_scope_builders_known_answers():
    """The scope strings the daemon stores and checks (docs/RBAC.md): one per owned kind, and each one
    parses back and lies within its tenant, not another."""
    assert rbac.vm_scope(T, V1) == f"/tenants/{T}/vms/{V1}"
    assert rbac.owned_scope("disk", T, V1) == f"/tenants/{T}/disks/{V1}"
    assert rbac.network_scope(T, N) == f"/tenants/{T}/networks/{N}"
    for s in (rbac.vm_scope(T, V1), rbac.owned_scope("disk", T, V2), rbac.network_scope(T, N)):
        assert rbac.validate_scope(s) == s
        assert rbac.scope_within(s, rbac.tenant_scope(T)) and not rbac.scope_within(s, rbac.tenant_scope(U))


@pytest.mark.parametrize("kind", ["tenant", "vms", "", "principal"])
def test_owned_scope_refuses_a_kind_that_is_not_tenant_owned(kind):
    with pytest.raises(ValueError, match="not a tenant-owned resource kind"):
        rbac.owned_scope(kind, T, V1)


def test_valid_patterns_are_returned_unchanged():
    for p in ("vm/*", "*/read", "audit/read", "*", "x" * 64):
        assert rbac.validate_pattern(p) == p


@pytest.mark.parametrize("engine", ["casbin", "pure"])
def test_assignment_to_a_missing_role_grants_nothing_and_does_not_crash(engine):
    """An assignment whose role was deleted (or never existed) is ignored; the principal's other
    assignments still work."""
    roles = _roles()
    owner = next(r for r in roles if r.name == "Owner")
    reader = next(r for r in roles if r.name == "Reader")
    ev = rbac.make_evaluator(engine)
    ev.load(roles, [Assignment("1", "p", "no-such-role", "/"), Assignment("2", "q", "no-such-role", "/")])
    assert not any(ev.allowed("p", a, s) for a in ACTIONS for s in TARGETS.values())
    ev.load(roles, [Assignment("1", "p", "no-such-role", "/"), Assignment("2", "p", reader.id, "/"),
                    Assignment("3", "q", owner.id, TARGETS["own tenant"])])
    assert ev.allowed("p", "vm/read", TARGETS["own VM"]) and not ev.allowed("p", "vm/start", TARGETS["own VM"])
    assert ev.allowed("q", "vm/start", TARGETS["own VM"]) and not ev.allowed("q", "vm/start", TARGETS["root"])


@pytest.mark.parametrize("engine", ["casbin", "pure"])
def test_role_without_actions_grants_nothing(engine):
    empty = RoleDef("empty", "Nothing", (), ("*",), ("/",), "", False)
    ev = rbac.make_evaluator(engine)
    ev.load([*_roles(), empty], [Assignment("1", "p", "empty", "/")])
    assert not any(ev.allowed("p", a, s) for a in ACTIONS for s in TARGETS.values())
