"""Behind a proxy: with --public-url the page's origin is the proxy's, the websocket is at /ws on
it, and the proxy's X-Forwarded-For counts (from the proxy only: each forwarded address is one
voice, test_voices.py). nginx itself: test_nginx.py.
"""

import http.client

import pytest
import websockets

from tests.helpers import PUBLIC, flood, get, handshake, receive, request


def test_public_url_config_sends_the_page_to_ws_on_its_own_origin(proxied_server):
    status, config = get(proxied_server.port, "/config")
    assert status == 200 and config["ws_path"] == "/ws"


def test_without_public_url_config_has_no_ws_path(server):
    assert get(server.port, "/config")[1]["ws_path"] is None


def test_public_url_page_policy_allows_the_wss_address(proxied_server):
    headers = {"Host": "chat.example.org"}
    status, _, _ = request(proxied_server.port, "GET", "/", headers=headers)
    connection = http.client.HTTPConnection("127.0.0.1", proxied_server.port, timeout=10)
    connection.request("GET", "/", headers=headers)
    policy = connection.getresponse().getheader("Content-Security-Policy")
    connection.close()
    assert status == 200
    assert "connect-src 'self' wss://chat.example.org/ws;" in policy


def test_public_url_origin_is_the_page_origin_for_posts_and_the_handshake(proxied_server):
    headers = {"Host": "chat.example.org", "Origin": PUBLIC}
    assert (
        request(
            proxied_server.port, "POST", "/messages", {"text": "via the proxy"}, headers=headers
        )[0]
        == 201
    )
    with handshake(proxied_server.ws_port, "chat.example.org", "/ws", origin=PUBLIC) as ws:
        assert [m["text"] for m in receive(ws, "history")["messages"]] == ["via the proxy"]
    direct = f"http://127.0.0.1:{proxied_server.port}"  # not the page's origin any more
    assert (
        request(
            proxied_server.port, "POST", "/messages", {"text": "x"}, headers={"Origin": direct}
        )[0]
        == 403
    )
    with (
        pytest.raises(websockets.exceptions.InvalidStatus) as refused,
        handshake(proxied_server.ws_port, "127.0.0.1", "/ws", origin=direct),
    ):
        pass
    assert refused.value.response.status_code == 403


# a client that claims a new address per post
NEW_ADDRESS_EACH_TIME = [f"198.51.100.{n}" for n in range(1, 30)]


def test_x_forwarded_for_from_anyone_but_the_proxy_is_ignored(proxied_server):
    assert 429 in flood(proxied_server.port, NEW_ADDRESS_EACH_TIME, source="127.0.0.2")


def test_x_forwarded_for_is_ignored_when_no_proxy_is_declared(server):
    assert 429 in flood(server.port, NEW_ADDRESS_EACH_TIME)
