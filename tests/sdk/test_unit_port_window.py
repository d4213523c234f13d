"""The credit rule of ForwardPort (`aviato.v1.port_window`), shared by the service and the SDK."""

from __future__ import annotations

import asyncio

import pytest

from aviato.v1.port_window import CHUNK, WINDOW, ReceiveWindow, SendWindow, WindowClosed


def test_a_sender_waits_for_credit_once_its_window_is_full() -> None:
    async def main() -> None:
        window = SendWindow()
        assert await window.room() == WINDOW
        window.sent(WINDOW)
        waiting = asyncio.ensure_future(window.room())
        await asyncio.sleep(0.01)
        assert not waiting.done()  # nothing more may be read from its socket
        window.credited(CHUNK)
        assert await waiting == CHUNK
        window.sent(CHUNK)
        window.close()  # the peer's stream ended: no credit will come
        with pytest.raises(WindowClosed):
            await window.room()

    asyncio.run(main())


def test_a_receiver_gives_credit_in_steps_and_refuses_a_peer_past_its_window() -> None:
    window = ReceiveWindow()
    window.received(CHUNK)
    assert window.delivered(CHUNK // 2) == 0  # less than a step: kept
    assert window.delivered(CHUNK // 2) == CHUNK
    window.received(10)
    assert window.delivered(10, flush=True) == 10  # a half-close or an idle queue: all of it
    window.received(WINDOW)
    with pytest.raises(ValueError, match="more than its window"):
        window.received(1)
