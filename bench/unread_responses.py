#!/usr/bin/env python3
"""Clients that pipeline requests and never read the answers, against a running wxauth.

    bench/unread_responses.sh        # starts wxauth and runs this
    bench/unread_responses.py HOST:PORT PID [N] [PIPELINED] [AFTER]

Opens N connections (default 1000), sends PIPELINED (default 200) pipelined
`GET /openapi.json` on each, and never reads. Reports the server's resident memory
(VmRSS) before, 15 s into the attack, once the server has closed the connections (or
they were closed here after 30 s), and AFTER seconds (default 60) later; and how many
connections the server itself closed. Standard library only.
"""

import os
import resource
import socket
import sys
import time

REQUEST = b"GET /openapi.json HTTP/1.1\r\nHost: bench\r\n\r\n"


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def mb(kb):
    return f"{kb / 1024:.0f} MB"


def closed_by_server(s):
    """True once the server has closed (or reset) the connection."""
    try:
        s.setblocking(False)
        while True:
            data = s.recv(1 << 16)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    port = int(port)
    pid = sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    pipelined = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    after = float(sys.argv[5]) if len(sys.argv) > 5 else 60
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    before = rss_kb(pid)
    print(f"before: VmRSS {mb(before)}")
    t0 = time.monotonic()
    conns = []
    payload = REQUEST * pipelined
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        # A small receive buffer: the client reads nothing, so what the kernel
        # holds for it is not what the server holds.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        try:
            s.send(payload)
        except OSError:
            pass
        conns.append(s)
    print(f"{n} connections, {pipelined} pipelined requests each, sent in {time.monotonic() - t0:.1f}s")
    time.sleep(15)
    during = rss_kb(pid)
    peak = during
    print(f"during (15 s): VmRSS {mb(during)}")
    # Wait for the server to drop them (bounded), then close the rest ourselves.
    end = time.monotonic() + 30
    closed = 0
    while time.monotonic() < end:
        closed = sum(1 for s in conns if closed_by_server(s))
        peak = max(peak, rss_kb(pid))
        if closed == n:
            break
        time.sleep(1)
    print(f"closed by the server: {closed} of {n} after {time.monotonic() - t0:.0f}s")
    for s in conns:
        s.close()
    released = time.monotonic()
    time.sleep(after)
    later = rss_kb(pid)
    print(f"after ({after:.0f} s after the connections closed): VmRSS {mb(later)}")
    print(
        f"RSS before {mb(before)}, during {mb(during)} (peak seen {mb(peak)}), "
        f"{after:.0f} s after {mb(later)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
