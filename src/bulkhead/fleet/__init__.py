"""The fleet: many bulkhead hosts on etcd (docs/FLEET.md).

model.py is the pure core (keys, host states, scheduler, fencing rules); store.py the etcd client layer;
agent.py the host agent (`bulkhead serve --fleet`); controller.py the leader-elected controller;
api.py the fleet API operations; cli.py the `bulkhead fleet` commands; etcdrun.py runs local etcd
clusters (tests, benchmarks, the README's one-machine fleet).
"""
