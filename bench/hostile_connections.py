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
                     ~16 s, trickling the head a few bytes at a time.
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


def main():
    mode, api, target, n, seconds = sys.argv[1], addr(sys.argv[2]), addr(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    tls = len(sys.argv) > 6 and sys.argv[6] == "1"
    target_tls = tls and target == api
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t0 = time.monotonic()
    conns, failed_open = [], 0
    next_step = []
    for i in range(n):
        try:
            s = connect(target, target_tls)
            if mode == "stalled-keepalive":
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                if read_answer(s) is None:
                    raise OSError("no answer")
                s.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            conns.append(s)
            next_step.append(time.monotonic() + (i % 16))
        except OSError:
            failed_open += 1
        if time.monotonic() - t0 > seconds / 2:
            break
    print(f"{mode}: {len(conns)} connections held, {failed_open} failed to open/answer, in {time.monotonic() - t0:.1f}s")

    trickle = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Pad: aaaaaaaaaaaaaaaa\r\n\r\n"
    progress = [0] * len(conns)
    dead = set()
    latencies, failures = [], 0
    end = time.monotonic() + seconds
    last_probe = 0
    while time.monotonic() < end:
        now = time.monotonic()
        if mode == "trickle":
            for i, s in enumerate(conns):
                if i in dead or now < next_step[i]:
                    continue
                try:
                    s.settimeout(10)
                    if progress[i] < len(trickle):
                        s.sendall(trickle[progress[i]:progress[i] + 4])
                        progress[i] += 4
                        # The whole head over ~11 s, then the answer, then ~5 s idle.
                        next_step[i] = now + 11 / (len(trickle) / 4)
                    else:
                        if read_answer(s) is None:
                            dead.add(i)
                        progress[i] = 0
                        next_step[i] = now + 4.5
                except OSError:
                    dead.add(i)
        if now - last_probe >= 0.5:
            last_probe = now
            took = healthz(api, tls)
            if took is None:
                failures += 1
                print(f"  t={now - t0:5.1f}s /healthz FAILED")
            else:
                latencies.append(took)
        time.sleep(0.01)
    if mode != "trickle":
        dead = {i for i, s in enumerate(conns) if closed(s)}
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0
    print(
        f"healthz: {len(latencies)} answered 200, {failures} failed; p50 {p50:.0f} ms, "
        f"max {max(latencies, default=0) * 1000:.0f} ms; attack connections closed by the server: "
        f"{len(dead)} of {len(conns)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
