"""Forwarding one plain-HTTP request in absolute form (`GET http://host/path`) and its response.

The request goes upstream in origin form (`GET /path`), its hop-by-hop and Proxy-* headers
removed and `Connection: close` added; the response comes back the same way. One request per
client connection: the gateway closes both connections after the response, so a second
request can never ride on a connection that was checked for the first.

`h11` frames both messages (Content-Length, chunked, close-delimited; HEAD; 1xx), so the body
is relayed exactly and nothing after it passes. Bounded: a head is at most MAX_HEAD bytes on
either side (larger: refused), a body passes in chunks of at most CHUNK bytes, each written and
drained before the next is read.
"""

from __future__ import annotations

import asyncio
import contextlib

import h11

from aviato.egress.proxy_http import MAX_HEAD, ProxyError, Refusal, forwarded_headers
from aviato.egress.relay import CHUNK, Counter

__all__ = ["forward"]


async def forward(
    client: h11.Connection,
    request: h11.Request,
    path: str,
    authority: str,
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
    sent: Counter,
    received: Counter,
) -> bool:
    """Sends `request` (already read from `client`) upstream with its body, and relays the
    response. True when the response was relayed whole. Raises Refusal when the upstream
    server's response was unusable before anything was relayed."""
    upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    headers = forwarded_headers(list(request.headers.raw_items()))
    if not any(name.lower() == b"host" for name, _ in headers):
        headers.insert(0, (b"Host", authority.encode("ascii")))
    head = upstream.send(
        h11.Request(method=request.method, target=path.encode("ascii"), headers=headers)
    )
    assert head is not None
    upstream_writer.write(head)
    sent(len(head))
    await upstream_writer.drain()
    upload = asyncio.ensure_future(_upload(client, upstream, client_reader, upstream_writer, sent))
    try:
        return await _download(client, upstream, upstream_reader, client_writer, received, upload)
    finally:
        upload.cancel()
        with contextlib.suppress(BaseException):
            await upload


async def _upload(
    client: h11.Connection,
    upstream: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    sent: Counter,
) -> None:
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await reader.read(CHUNK))
            continue
        if isinstance(event, h11.Data | h11.EndOfMessage):
            data = upstream.send(event if isinstance(event, h11.Data) else h11.EndOfMessage())
            if data:
                writer.write(data)
                sent(len(data))
                await writer.drain()
            if isinstance(event, h11.EndOfMessage):
                return
            continue
        return  # ConnectionClosed or PAUSED: nothing more of this request


async def _download(
    client: h11.Connection,
    upstream: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    received: Counter,
    upload: asyncio.Future[None],
) -> bool:
    started = False
    while True:
        if upload.done() and not upload.cancelled() and upload.exception() is not None:
            return False  # the client's side broke
        try:
            event = upstream.next_event()
        except h11.RemoteProtocolError as e:
            if started:
                return False
            raise Refusal(
                ProxyError.HTTP_RESPONSE_INCOMPLETE,
                f"the server's response is not valid HTTP ({e})",
            ) from None
        if event is h11.NEED_DATA:
            upstream.receive_data(await reader.read(CHUNK))
            continue
        if isinstance(event, h11.ConnectionClosed):
            if started:
                return False
            raise Refusal(
                ProxyError.HTTP_RESPONSE_INCOMPLETE, "the server closed without a response"
            )
        out: bytes | None
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return False  # no protocol upgrade through a forwarded request
            out = client.send(
                h11.InformationalResponse(
                    status_code=event.status_code,
                    headers=forwarded_headers(list(event.headers.raw_items()))[:-1],
                    reason=event.reason,
                )
            )
        elif isinstance(event, h11.Response):
            started = True
            out = client.send(
                h11.Response(
                    status_code=event.status_code,
                    headers=forwarded_headers(list(event.headers.raw_items())),
                    reason=event.reason,
                )
            )
        elif isinstance(event, h11.Data):
            out = client.send(h11.Data(data=event.data))
        elif isinstance(event, h11.EndOfMessage):
            out = client.send(h11.EndOfMessage())
        else:
            return False
        if out:
            writer.write(out)
            received(len(out))
            await writer.drain()
        if isinstance(event, h11.EndOfMessage):
            return True
