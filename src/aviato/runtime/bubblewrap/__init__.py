"""The bubblewrap runtime: sandboxes on this machine (bubblewrap, cgroups, seccomp, a supervisor).

- `runtime`: `BubblewrapRuntime`, the `Runtime` (create, attach after a restart, cleanup, images);
- `sandbox`: `BubblewrapSandbox`, the handle of one sandbox;
- `launch`: starting a sandbox's host processes and reaching its control socket;
- `records`: `runtime.json`, what a later service re-attaches by;
- `exit_record`: how a sandbox ended (the supervisor's exit record, the OOM counter);
- `host_processes`: watching and killing host processes, /proc, the descriptor limit.
"""

from aviato.runtime.bubblewrap.host_processes import raise_fd_limit
from aviato.runtime.bubblewrap.launch import SandboxExists, SandboxStartFailed
from aviato.runtime.bubblewrap.runtime import BubblewrapRuntime
from aviato.runtime.bubblewrap.sandbox import BubblewrapSandbox

__all__ = [
    "BubblewrapRuntime",
    "BubblewrapSandbox",
    "SandboxExists",
    "SandboxStartFailed",
    "raise_fd_limit",
]
