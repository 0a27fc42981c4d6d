"""Free TCP ports for servers the tests start.

Ports come from below the kernel's ephemeral range (32768+): a port that
bind(0) hands out can be taken again by any outgoing connection in the
moment before the server process binds it, which makes tests flaky.
"""

from __future__ import annotations

import random

from stack.process import port_in_use

_given: set[int] = set()


def free_port() -> int:
    while True:
        port = random.randint(20_000, 32_000)
        if port not in _given and not port_in_use("127.0.0.1", port):
            _given.add(port)
            return port
