"""The protocol between the control plane and the node hosts of a cluster (not the public API)."""
