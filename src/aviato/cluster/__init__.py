"""Running sandboxes on a Ray cluster (`aviato server --placement ray`).

Four pieces, one module each:

- `nodehost`: the `NodeHost` actor, one per Ray node (detached, named, pinned to its node,
  `num_cpus=0`). It runs a `BubblewrapRuntime` there, owns that node's sandboxes, and fences itself
  (kills its sandboxes) when it loses the cluster for longer than its lease.
- `remote`: `NodeRuntime`, the control plane's `Runtime` for one node: calls go to the node's
  actor, exec and file transfers to its direct gRPC channel.
- `execwire`: that direct channel (exec and files, the public API's messages, a per-host token).
- `placement`: `RayPlacement`, which joins the cluster as a driver, starts node hosts on every
  node that can run sandboxes (and on nodes that join later), chooses a node by requested cpu,
  memory and node selector, and turns a dead node's sandboxes FAILED "node lost".

Ray is an optional dependency (`pip install 'aviato[ray]'`): nothing here is imported unless the
ray placement is chosen.
"""
