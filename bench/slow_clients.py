#!/usr/bin/env python3
"""Slow-body clients against a running wxauth, and whether /healthz still answers.

    bench/slow_clients.sh            # starts wxauth under `ulimit -n 1024` and runs this
    bench/slow_clients.py HOST:PORT [N] [SECONDS] [PID]

Opens N connections (default 2000) that each send a complete request head with
`Content-Length: 100` and 10 bytes of body, then stall. Connections are opened
without blocking: past the server's connection cap they wait in the listen backlog,
and past the backlog the kernel drops their SYNs (they count as "not connected").
Then, for SECONDS (default 30), it probes GET /healthz one request at a time (each
with a 30 s timeout) and counts the slow connections the server has closed.
With PID, it also reports the server's peak resident memory (VmHWM) and open files.
Standard library only.
"""

import os
import resource
import selectors
import socket
import sys
import time

HEAD = (
    "POST /api/token/verify/ HTTP/1.1\r\nHost: bench\r\n"
    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
)
PARTIAL = b'{"token": '


def healthz(host, port):
    """Seconds GET /healthz took, or None when it failed or took over 30 s."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=30) as s:
            s.settimeout(30)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        if data.startswith(b"HTTP/1.1 200"):
            return time.monotonic() - started
    except OSError:
        pass
    return None


def proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split()[1] + " kB"
    except OSError:
        pass
    return "?"


def open_files(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return "?"


def main():
    target = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 30
    pid = sys.argv[4] if len(sys.argv) > 4 else None
    host, port = target.rsplit(":", 1)
    port = int(port)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sel = selectors.DefaultSelector()
    pending = []
    t0 = time.monotonic()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        sel.register(s, selectors.EVENT_WRITE)
        pending.append(s)
    # Send the head and part of the body on every connection that completes.
    stalled, deadline = [], time.monotonic() + 5
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            sel.unregister(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                try:
                    s.sendall(HEAD.encode() + PARTIAL)
                    stalled.append(s)
                except OSError:
                    s.close()
            else:
                s.close()
    not_connected = len(sel.get_map())
    for key in list(sel.get_map().values()):
        sel.unregister(key.fileobj)
        key.fileobj.close()
    print(
        f"slow clients: {len(stalled)} of {n} connected and stalled after "
        f"{time.monotonic() - t0:.1f}s ({not_connected} not connected: SYN dropped, backlog full)"
    )
    if pid:
        print(f"server: {open_files(pid)} open files, VmRSS {proc_status(pid, 'VmRSS')}")

    # Probe /healthz, and watch the stalled connections being closed.
    for s in stalled:
        sel.register(s, selectors.EVENT_READ)
    closed, latencies, failures = 0, [], 0
    end = time.monotonic() + seconds
    first_ok = None
    while time.monotonic() < end:
        took = healthz(host, port)
        now = time.monotonic() - t0
        if took is None:
            failures += 1
            print(f"  t={now:5.1f}s /healthz FAILED")
        else:
            latencies.append(took)
            if first_ok is None:
                first_ok = now
            print(f"  t={now:5.1f}s /healthz 200 in {took * 1000:.0f} ms")
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                closed += 1
    print(
        f"healthz: {len(latencies)} answered 200, {failures} failed; "
        f"max {max(latencies, default=0) * 1000:.0f} ms; "
        f"slow connections closed by the server: {closed} of {len(stalled)}"
    )
    if pid:
        print(f"server: peak VmHWM {proc_status(pid, 'VmHWM')}, now {open_files(pid)} open files")
    return 0 if failures == 0 and latencies else 1


if __name__ == "__main__":
    sys.exit(main())
