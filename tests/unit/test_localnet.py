"""free_port and wait_until_ready against real loopback sockets."""

from __future__ import annotations

import http.server
import threading

import pytest

from mlxd.localnet import NotReady, free_port, wait_until_ready


def test_wait_until_ready_returns_once_the_server_answers() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_until_ready(f"http://127.0.0.1:{server.server_port}/", 10, lambda: None)
    finally:
        server.shutdown()


def test_a_failure_ends_the_wait_with_its_message() -> None:
    with pytest.raises(NotReady, match="exited with 3"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}/", 30, lambda: "exited with 3")


def test_nobody_answering_times_out() -> None:
    with pytest.raises(NotReady, match="no answer"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}/", 0.3, lambda: None, interval=0.05)
