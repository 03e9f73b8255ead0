"""Defense in depth around each VM: a jailed worker process per guest and a closed protocol to the host.

Modules: policy (seccomp allow-lists as data), protocol (host <-> worker messages), jail (namespaces,
pivot_root, ids, capabilities, seccomp), cgroups, worker (`bulkhead worker`), supervisor (host side),
probes (test-only escape probes). See docs/SANDBOX.md.
"""
