#!/usr/bin/env python3
"""Connections that hold their slots, and /healthz latency meanwhile.

    bench/hostile_connections.sh MODE      # starts wxauth for MODE and runs this
    bench/hostile_connections.py MODE API_HOST:PORT TARGET_HOST:PORT N SECONDS [TLS]

MODE:
  stalled-keepalive  N connections each send one GET /healthz, read the answer, then
                     send the start of a second head (`GET /healthz HTTP/1.1\\r\\nHo`)
                     and go silent. Against TARGET (the API, over TLS when TLS=1,
                     or the metrics listener).
  trickle            N connections from 127.0.0.1 each complete one request every
                     ~14 s, trickling the head a few bytes at a time over ~9 s.
Meanwhile /healthz is asked on the API, one request at a time, from 127.0.0.2 (over
TLS when TLS=1), each with a 10 s timeout. Prints each probe's latency, then the
count, the failures, p50 and max, and how many attack connections the server closed.
Standard library only; every loop stops by itself after SECONDS.
"""

import resource
import selectors
import socket
import ssl
import sys
import threading
import time

CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE


def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def connect(target, tls, source="127.0.0.1"):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(target)
    if tls:
        s = CTX.wrap_socket(s, server_hostname="localhost")
    return s


def read_answer(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            return None
        body += chunk
    return head


def healthz(api, tls):
    started = time.monotonic()
    try:
        s = connect(api, tls, "127.0.0.2")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        head = read_answer(s)
        s.close()
        if head and head.startswith(b"HTTP/1.1 200"):
            return time.monotonic() - started
    except OSError:
        pass
    return None


def closed(s):
    try:
        s.setblocking(False)
        data = s.recv(4096)
        return not data
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


class Trickler:
    """One connection completing a trickled request every ~14 s: the head four bytes
    at a time over ~9 s, the answer read, ~4.5 s idle (under every deadline); never
    blocking."""

    HEAD = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Pad: aaaaaaaaaaaaaaaa\r\n\r\n"

    def __init__(self, target, start):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.s.setblocking(False)
        self.s.connect_ex(target)
        self.sent, self.received, self.at, self.dead, self.answers = 0, b"", start, False, 0

    def step(self, now):
        if self.dead:
            return
        try:
            if self.sent < len(self.HEAD):
                if now >= self.at:
                    self.sent += self.s.send(self.HEAD[self.sent:self.sent + 4])
                    self.at = now + 9 / (len(self.HEAD) / 4)
                return
            try:
                chunk = self.s.recv(65536)
                if not chunk:
                    self.dead = True
                    return
                self.received += chunk
            except BlockingIOError:
                pass
            if b"\r\n\r\n" in self.received and self.received.endswith(b"}"):
                self.answers += 1
                self.received, self.sent, self.at = b"", 0, now + 4.5
        except BlockingIOError:
            pass
        except OSError:
            self.dead = True


def main():
    mode, api, target, n, seconds = sys.argv[1], addr(sys.argv[2]), addr(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    tls = len(sys.argv) > 6 and sys.argv[6] == "1"
    target_tls = tls and target == api
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t0 = time.monotonic()
    conns, failed_open = [], 0
    if mode == "trickle":
        conns = [Trickler(target, t0 + (i % 16) * 0.05) for i in range(n)]
    else:
        for _ in range(n):
            try:
                s = connect(target, target_tls)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                if read_answer(s) is None:
                    raise OSError("no answer")
                s.sendall(b"GET /healthz HTTP/1.1\r\nHo")
                conns.append(s)
            except OSError:
                failed_open += 1
            if time.monotonic() - t0 > seconds / 2:
                break
    print(f"{mode}: {len(conns)} connections, {failed_open} failed to open or get an answer, in {time.monotonic() - t0:.1f}s")

    # The probe runs on its own thread: a slow answer must not pause the attack.
    latencies, failures = [], []
    end = time.monotonic() + seconds

    def probe():
        while time.monotonic() < end:
            started = time.monotonic()
            took = healthz(api, tls)
            if took is None:
                failures.append(started - t0)
                print(f"  t={started - t0:5.1f}s /healthz FAILED")
            else:
                latencies.append(took)
            time.sleep(max(0.0, 0.5 - (time.monotonic() - started)))

    prober = threading.Thread(target=probe)
    prober.start()
    while time.monotonic() < end:
        if mode == "trickle":
            now = time.monotonic()
            for c in conns:
                c.step(now)
        time.sleep(0.01)
    prober.join()
    failures = len(failures)
    if mode == "trickle":
        closed_count = sum(1 for c in conns if c.dead)
        answers = sum(c.answers for c in conns)
        print(f"trickled requests answered: {answers}")
    else:
        closed_count = sum(1 for s in conns if closed(s))
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0
    print(
        f"healthz: {len(latencies)} answered 200, {failures} failed; p50 {p50:.0f} ms, "
        f"max {max(latencies, default=0) * 1000:.0f} ms; attack connections closed by the server: "
        f"{closed_count} of {len(conns)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
