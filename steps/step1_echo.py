"""Step 1: a websockets echo server. Left out: the room (step 2), HTTP (step 3); chat.py: /echo."""

import argparse
import asyncio
import contextlib

from websockets.asyncio.server import serve


async def echo(connection):
    async for frame in connection:
        await connection.send(frame)


async def main(ws_port):
    async with serve(echo, "127.0.0.1", ws_port) as server:
        print(f"Websocket:  ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ws-port", type=int, default=8765, help="0 for any free port")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: stop, without a traceback
        asyncio.run(main(parser.parse_args().ws_port))
