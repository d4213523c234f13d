"""`aviato.Secret` and ``Sandbox.run(secrets=[...])`` against the autostarted local service
(docs/secrets.md): create, list (no value anywhere in what comes back), use in the main process
and commands, refusals in the user's words, delete; sync and async."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from aviato import Sandbox, SandboxDefaults, Secret
from aviato.exceptions import SandboxError, SandboxNotFoundError, SandboxValidationError


def test_a_secret_from_create_to_a_sandbox_and_back_out() -> None:
    name, value = "SDK_TEST_TOKEN", "tok-" + secrets.token_hex(8)
    made = Secret.create(name, value).result()
    try:
        assert made.name == name and made.created_at is not None
        assert value not in repr(made)
        assert name in [s.name for s in Secret.list().result()]
        with pytest.raises(SandboxError, match="already") as err:
            Secret.create(name, "other").result()
        assert err.value.code == "ALREADY_EXISTS"
        defaults = SandboxDefaults(secrets=(name,))
        with Sandbox.run("sh", "-c", f'echo "main:${name}" >&2; exec sleep 600',
                         defaults=defaults) as sb:  # fmt: skip
            assert sb.exec(["printenv", name]).result().stdout.strip() == value
            assert sb.secrets == [name]
        with pytest.raises(SandboxValidationError) as err:
            Sandbox.run(secrets=[name], environment_variables={name: "x"})
        assert "both an environment variable and a secret" in str(err.value)
    finally:
        Secret.delete(name).result()
    assert name not in [s.name for s in Secret.list().result()]
    with pytest.raises(SandboxNotFoundError, match=f"no secret named {name}"):
        Secret.delete(name).result()


def test_refusals_name_the_argument_and_never_repeat_a_value() -> None:
    with pytest.raises(SandboxValidationError) as err:
        Sandbox.run(secrets=["NOBODY_HAS_THIS"])
    text = str(err.value)
    assert "secrets" in text and "you have no secret named NOBODY_HAS_THIS" in text
    assert "spec." not in text and "INVALID_ARGUMENT" not in text
    # A value given where the name goes is not repeated.
    with pytest.raises(SandboxValidationError) as err:
        Secret.create("sk-live-abc123", "OPENAI_API_KEY")
    assert "sk-live-abc123" not in str(err.value)
    with pytest.raises(SandboxValidationError, match="list of secret names"):
        Sandbox.run(secrets="OPENAI_API_KEY")  # type: ignore[arg-type]


def test_async() -> None:
    async def main() -> list[str]:
        await Secret.create("SDK_ASYNC", "a", replace=True)
        names = [s.name for s in await Secret.list()]
        await Secret.delete("SDK_ASYNC")
        return names

    assert "SDK_ASYNC" in asyncio.run(main())
