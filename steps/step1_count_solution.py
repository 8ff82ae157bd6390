"""Step 1's exercise, solved: the server speaks first (a welcome with the client's number, shared
by all), and numbers each echo (a count of each client's own)."""

import argparse
import asyncio

from websockets.asyncio.server import serve

clients_so_far = 0  # one for the whole server: every connection's handler sees it


async def echo(connection):
    global clients_so_far
    clients_so_far += 1
    await connection.send(f"welcome, client {clients_so_far}")
    count = 0  # a local variable: each connection's handler has its own
    async for frame in connection:
        count += 1
        await connection.send(f"{count}: {frame}")


async def main(ws_port):
    async with serve(echo, "127.0.0.1", ws_port) as server:
        print(f"Websocket:  ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ws-port", type=int, default=8765, help="0 for any free port")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.ws_port))
    except KeyboardInterrupt:  # Ctrl+C: stop, without a traceback
        pass
    except OSError as error:  # the port is taken (another step still runs?): one line, exit 2
        where = f"cannot listen on port {args.ws_port}"
        parser.exit(2, f"{parser.prog}: error: {where}: {error.strerror}\n")
