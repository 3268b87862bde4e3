"""The NDJSON stream client writes its body while it reads the streamed results: against a
tiny local server that answers each line as soon as it is read (more than the sockets'
buffers hold both ways, so a client that sent first and read after would stall), every
line's result is counted, in order, with the closing summary."""

from __future__ import annotations

import asyncio

import h11
import orjson

from bench.stream import send_stream


async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(our_role=h11.SERVER)
    index = accepted = rejected = 0
    tail = b""
    started = False
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Request):
            assert dict(event.headers)[b"content-type"] == b"application/x-ndjson"
            writer.write(
                conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[
                            ("Content-Type", "application/x-ndjson"),
                            ("Transfer-Encoding", "chunked"),
                        ],
                    )
                )
            )
            started = True
        elif isinstance(event, h11.Data):
            *lines, tail = (tail + bytes(event.data)).split(b"\n")
            out = []
            for line in lines:
                try:
                    item = orjson.loads(line)
                    out.append(
                        {
                            "index": index,
                            "status": 202,
                            "request_id": "r" * 200,
                            "trade_id": item["trade_id"],
                            "version": 1,
                        }
                    )
                    accepted += 1
                except orjson.JSONDecodeError:
                    out.append({"index": index, "status": 422, "problem": {"code": "INVALID_JSON"}})
                    rejected += 1
                index += 1
            writer.write(conn.send(h11.Data(data=b"".join(orjson.dumps(o) + b"\n" for o in out))))
            await writer.drain()
        elif isinstance(event, h11.EndOfMessage):
            assert started
            summary = orjson.dumps({"batch_id": "b1", "accepted": accepted, "rejected": rejected})
            writer.write(conn.send(h11.Data(data=summary + b"\n")))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            writer.close()
            return


async def exchange(lines: list[bytes]):  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await asyncio.wait_for(send_stream("127.0.0.1", port, lines, chunk_bytes=4096), 30)


def test_results_stream_back_while_the_body_is_written() -> None:
    lines = [b'{"trade_id": "T-%d"}' % n for n in range(20_000)]
    lines[7] = b"{broken"
    res = asyncio.run(exchange(lines))
    assert res.error is None
    assert res.status == 200
    assert res.lines_sent == 20_000
    assert res.results == 20_000
    assert res.out_of_order == 0
    assert res.statuses == {202: 19_999, 422: 1}
    assert res.summary == {"batch_id": "b1", "accepted": 19_999, "rejected": 1}
    assert res.figures()["trades_per_s"] > 0
