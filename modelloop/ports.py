"""A TCP port the OS picks, for starting a local server: the demo, the benchmarks and the tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing holds now, picked by the OS (``bind((host, 0))``).

    Another process may take it before the caller's server binds it: start the server, then
    poll its readiness against a deadline.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
