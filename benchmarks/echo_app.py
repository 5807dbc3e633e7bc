"""The HTTP ceiling of benchmarks/serve_speed.py: an ASGI app that reads each request's body
and answers a fixed small JSON document, served by the same uvicorn as the model server.
Nothing is parsed and no model runs: what it measures is the client, the loopback, uvicorn
and this machine."""

ANSWER = b'{"predictions": [[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]}'


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = ANSWER if scope["path"] == "/invocations" else b"\n"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
