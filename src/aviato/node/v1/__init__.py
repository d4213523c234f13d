"""aviato.node.v1: generated stubs of node.proto (scripts/generate_protos.sh)."""
