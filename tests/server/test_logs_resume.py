"""`Sandbox.stream_logs(follow=True)` across a real restart of the service: the stream resumes
by itself (StreamLogsRequest.since), with no record lost or repeated; and `since` itself."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from server_helpers import ServerProcess

from aviato import Sandbox

COUNT = 300
# One record per line: each `echo` is its own write, 10 ms apart.
WRITER = f"i=0; while [ $i -lt {COUNT} ]; do echo rec-$i; i=$((i+1)); sleep 0.01; done"
EXPECTED = "".join(f"rec-{i}\n" for i in range(COUNT))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["graceful", "kill9"])
def test_follow_resumes_across_a_restart_of_the_service(
    fresh_server: ServerProcess, how: str
) -> None:
    fresh_server.start()
    sb = Sandbox.run("sh", "-c", WRITER, base_url=f"unix://{fresh_server.socket_path}")
    records = iter(sb.stream_logs(follow=True, timeout_seconds=120))
    seen = ""
    while "rec-40\n" not in seen:
        seen += next(records).text
    if how == "graceful":
        assert fresh_server.stop() == 0
    else:
        fresh_server.kill9()
    time.sleep(0.5)  # the sandbox writes on meanwhile, into a log nobody reads
    fresh_server.start()
    for record in records:  # ends when the sandbox ends
        seen += record.text
    assert seen == EXPECTED


def test_since_keeps_the_records_from_a_time_on(server: ServerProcess) -> None:
    url = f"unix://{server.socket_path}"
    script = "echo early; sleep 0.5; echo late"
    sb = Sandbox.run("sh", "-c", script, base_url=url)
    sb.wait_until_complete().result(timeout=30)
    records = list(sb.stream_logs())
    assert [r.text for r in records] == ["early\n", "late\n"]
    late = records[1].time
    assert late is not None
    assert [r.text for r in sb.stream_logs(since=late)] == ["late\n"]
    assert [r.text for r in sb.stream_logs(since=late.timestamp() - 0.2)] == ["late\n"]
    naive = (late - timedelta(seconds=0.2)).astimezone(UTC).replace(tzinfo=None)
    assert [r.text for r in sb.stream_logs(since=naive)] == ["late\n"]
    assert list(sb.stream_logs(since=datetime.now(UTC) + timedelta(hours=1))) == []
    assert [r.text for r in sb.stream_logs(since=0, tail=1)] == ["late\n"]
    with pytest.raises(TypeError, match="since"):
        sb.stream_logs(since="yesterday")  # type: ignore[arg-type]
