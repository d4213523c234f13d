"""Running sandboxes on a Ray cluster (`aviato server --placement ray`).

- `nodehost`: the `NodeHost` actor, one per Ray node (detached, named, pinned to its node,
  `num_cpus=0`). It runs a `BubblewrapRuntime` there, owns that node's sandboxes, and fences itself
  (kills its sandboxes) when it loses the cluster for longer than its lease.
- `remote`: `NodeRuntime`, the control plane's `Runtime` for one node, and its sandbox handles;
  `remote_exec` their exec handles, `node_images` the node's image store, `link` the calls to
  the node host (Ray actor calls and the direct channel) raced against the node's loss.
- `execwire`: the direct channel (exec and files over gRPC, a per-host token).
- `codec`: the one conversion between the runtime's model and the node protocol
  (`aviato.node.v1`, aviato/node/v1/node.proto), used by both sides; its version check.

The placement itself, `RayPlacement` (joins the cluster as a driver, starts node hosts on every
node that can run sandboxes, chooses a node, turns a dead node's sandboxes FAILED "node lost"),
is the service's: `aviato/server/ray_placement.py`. Nothing here imports the service.

Ray is an optional dependency (`pip install 'aviato[ray]'`): nothing here is imported unless the
ray placement is chosen. docs/internals/parts/cluster.md describes the protocol.
"""
