"""What `BubblewrapRuntime.describe` says of the bound on all sandboxes together."""

from __future__ import annotations

from aviato.runtime.cgroups import CgroupManager

__all__ = ["describe_parent"]


def _show_bytes(n: int) -> str:
    for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n} bytes"


def describe_parent(cgroups: CgroupManager, problems: list[str]) -> str:
    """The bound on all sandboxes together, as the kernel has it now."""
    if not cgroups.available:
        return "none (no cgroups)"
    memory, pids = cgroups.parent_limits()
    text = (
        f"memory {_show_bytes(memory) if memory is not None else 'no limit'}, "
        f"pids {pids if pids is not None else 'no limit'} "
        f"(parent cgroup {cgroups.parent})"
    )
    if problems:
        text += "; not set: " + "; ".join(problems)
    return text
