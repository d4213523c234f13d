"""The service's refusals of a field, in the words the user wrote the call with.

The service names the field of its request that it refused, as a path of the wire message
("spec.resources.memory", "init.argv[0]", "spec.egress[1].dns_name"), in the `ErrorDetail` and
at the head of its message. A user of the SDK wrote ``resources={"memory": ...}``, a command,
``network=NetworkOptions(egress=[...])``: `in_user_words` replaces the path by that, so that
no message of the SDK (or of the command line, which prints the SDK's) shows a wire path.
"""

from __future__ import annotations

__all__ = ["in_user_words"]

# Wire path -> the argument as the user wrote it; "" says the problem alone is the message
# (it names what it is about). Longest prefixes first.
_WORDS: tuple[tuple[str, str], ...] = (
    ("spec.resources.memory", 'resources["memory"]'),
    ("spec.resources.cpu", 'resources["cpu"]'),
    ("spec.resources.pids", 'resources["pids"]'),
    ("spec.resources.disk", 'resources["disk"]'),
    ("spec.resources", "resources"),
    ("spec.image_command", "image_command"),
    ("spec.image", "container_image"),
    ("spec.command", "command"),
    ("spec.env", "environment_variables"),
    ("spec.working_dir", "working_dir"),
    ("spec.tags", "tags"),
    ("spec.max_lifetime_seconds", "max_lifetime_seconds"),
    ("spec.idle_timeout_seconds", "idle_timeout_seconds"),
    ("spec.mounted_files", "mounted_files"),
    ("spec.egress_mode", "network.egress_mode"),
    ("spec.egress", "network.egress"),
    ("spec.exposed_ports", "network.exposed_ports"),
    ("spec.network", "network"),
    ("spec.node_selector", "node_selector"),
    ("spec.registry_auth", "image_pull_credentials"),
    ("spec.mounts", "volumes"),
    ("spec.writable_layer", "writable_layer"),
    ("spec.snapshot_id", "snapshot"),
    ("spec.secrets", "secrets"),
    ("spec", "the sandbox's options"),
    ("init.argv", ""),
    ("init.cwd", "cwd"),
    ("init.env", "env"),
    ("init.timeout_seconds", "timeout_seconds"),
    ("init.tty_size", "the terminal's size"),
    ("init.protected", "protected"),
    ("request_id", ""),
    ("page_token", ""),
    ("snapshot_id", ""),
    ("seconds", ""),
)
# Parts of a path the user never wrote: a mount's index (volumes are a dict by path).
_DROP_REST = frozenset({"volumes", "secrets", "the sandbox's options"})


def _words_of(field: str) -> str | None:
    for path, words in _WORDS:
        if field == path or field.startswith((path + ".", path + "[")):
            rest = field[len(path) :]
            if not words or words in _DROP_REST:
                return words
            return words + rest
    return None


def in_user_words(field: str, message: str) -> str:
    """`message` ("<field>: <problem>") with its field in the user's words; unchanged when it
    does not start with the field or the field is not one the SDK sends."""
    lead = f"{field}: "
    if not field or not message.startswith(lead):
        return message
    words = _words_of(field)
    if words is None:
        return message
    problem = message[len(lead) :]
    return f"{words}: {problem}" if words else problem
