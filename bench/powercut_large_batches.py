#!/usr/bin/env python3
"""A power cut right after a large write was answered: is all of it there?

Two scenarios, each the largest batches wxauth writes (sled stores a journal record
over ~128 KiB in a blob file that its flush never fsyncs, so such a record would be
lost):
- `restore`: `wxauth restore` of a generated backup of ENTRIES entries into an empty
  directory, cut once restore has exited 0;
- `revoke`: a server (the built-in mock WeChat) logs one user in ENTRIES times, then
  `wxauth tokens revoke --user 1` answers through the admin socket; cut right after.
Each round mounts powercutfs (the power-loss file system of the powercut harness:
writes stay volatile until their file is fsynced, a cut drops every volatile write),
runs the scenario, cuts, mounts the post-crash disk afresh and takes an offline
`wxauth backup` of it (which opens the database and replays its journal). The round
passes when that backup holds every restored entry, or every family revoked.

    python3 bench/powercut_large_batches.py --powercut DIR --wxauth target/debug/wxauth \
        --workdir /tmp/powercut-batches --scenario restore --rounds 5 --entries 20000

DIR is the powercut harness (harness.py, powercutfs.py); run it with a Python that
has fusepy, as root (FUSE). Prints one JSON line per round and a summary line;
exits 1 when a round lost anything.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request


def write_backup(path, entries):
    keys = []
    with open(path, 'w') as out:
        out.write(json.dumps({"format": "wxauth-backup", "version": 1,
                              "created_at": "2026-01-01T00:00:00Z"}) + "\n")
        for n in range(entries):
            key = ("%032x" % n).encode().hex()
            keys.append(key)
            out.write(json.dumps({
                "tree": "refresh_tokens", "key": key,
                "value": {"family": "%032x" % (n // 4), "user_id": n // 4 + 1,
                          "exp": 4000000000, "padding": "p" * 200},
            }) + "\n")
        out.write(json.dumps({"end": True, "entries": entries}) + "\n")
    return set(keys)


def entries_of(backup_path):
    keys, closing = set(), None
    with open(backup_path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("tree") == "refresh_tokens":
                keys.add(record["key"])
            if record.get("end"):
                closing = record["entries"]
    return keys, closing


def start_server(wxauth, config, log_path):
    log = open(log_path, 'ab')
    proc = subprocess.Popen([wxauth, '--config', config, 'serve'], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with open(log_path, 'rb') as f:
            for line in f.read().decode(errors='replace').splitlines():
                if 'listening' in line and 'address=' in line:
                    return proc, line.split('address=')[1].split()[0]
        if proc.poll() is not None:
            raise RuntimeError('wxauth exited at start; see %s' % log_path)
        time.sleep(0.05)
    raise RuntimeError('wxauth did not listen; see %s' % log_path)


def log_in_many(address, count, threads=8):
    def worker(first):
        for n in range(first, count, threads):
            request = urllib.request.Request(
                'http://%s/api/weixin/login/' % address,
                data=json.dumps({"code": "many.%d" % n}).encode(),
                headers={'Content-Type': 'application/json'})
            with urllib.request.urlopen(request, timeout=60) as answer:
                assert answer.status == 200
    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def families_of(backup_path):
    families = []
    with open(backup_path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("tree") == "token_families":
                families.append(record["value"])
    return families


def head(stderr):
    """The first lines of an error output (a panic's message, not its backtrace)."""
    return " | ".join(stderr.strip().splitlines()[:3])[:400]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--powercut', required=True, help='the powercut harness directory')
    parser.add_argument('--wxauth', required=True)
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--scenario', choices=['restore', 'revoke'], default='restore')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--entries', type=int, default=20000)
    parser.add_argument('--fsync-delay-ms', type=float, default=2.0)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.powercut))
    from harness import Mount  # noqa: E402

    wxauth = os.path.abspath(args.wxauth)
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    backup = os.path.join(work, 'backup.jsonl')
    expected = write_backup(backup, args.entries) if args.scenario == 'restore' else None
    failures = 0
    for round_no in range(args.rounds):
        base = os.path.join(work, 'r%03d' % round_no)
        backing, mnt = os.path.join(base, 'backing'), os.path.join(base, 'mnt')
        sock, log = os.path.join(base, 'ctl.sock'), os.path.join(base, 'fs.log')
        os.makedirs(base)
        config = os.path.join(base, 'config.toml')
        with open(config, 'w') as f:
            f.write('[server]\nbind = "127.0.0.1:0"\n[wechat]\nmock = true\n'
                    '[limits]\nlogin_per_minute = 0\n[log]\nlevel = "warn"\n'
                    '[metrics]\nbind = ""\n[storage]\npath = "%s"\n'
                    % os.path.join(mnt, 'data'))
        record = {"round": round_no, "scenario": args.scenario, "entries": args.entries}
        mount = Mount(backing, mnt, sock, log, direct_io=True,
                      fsync_delay_ms=args.fsync_delay_ms)
        server = None
        try:
            started = time.time()
            if args.scenario == 'restore':
                done = subprocess.run([wxauth, '--config', config, 'restore', backup],
                                      capture_output=True, text=True)
            else:
                os.environ['RUST_LOG'] = 'warn,wxauth::startup=info'
                server, address = start_server(wxauth, config, os.path.join(base, 'wxauth.log'))
                log_in_many(address, args.entries)
                done = subprocess.run([wxauth, '--config', config, 'tokens', 'revoke',
                                       '--user', '1'], capture_output=True, text=True)
                server.send_signal(signal.SIGSTOP)   # our own server, by PID
            record["exit"] = done.returncode
            record["secs"] = round(time.time() - started, 1)
            blobs = os.path.join(mnt, 'data', 'blobs')
            record["blob_files"] = len(os.listdir(blobs)) if os.path.isdir(blobs) else 0
            dropped = mount.cut()
            record["dropped_files"] = sorted(dropped["dropped_files"])
            record["dropped_write_bytes"] = dropped["dropped_write_bytes"]
        finally:
            if server is not None:
                server.kill()
                server.wait()
            mount.unmount()
        if record["exit"] != 0:
            record["failure"] = "%s failed: %s" % (args.scenario, head(done.stderr))
        else:
            after = Mount(backing, mnt, sock, log, direct_io=True)
            try:
                copy = os.path.join(base, 'after.jsonl')
                taken = subprocess.run([wxauth, '--config', config, 'backup', copy],
                                       capture_output=True, text=True)
                record["reopen_exit"] = taken.returncode
                if taken.returncode != 0:
                    record["failure"] = "the database does not open after the cut: " \
                        + head(taken.stderr)
                elif args.scenario == 'restore':
                    keys, closing = entries_of(copy)
                    record["entries_after_cut"] = closing
                    lost = len(expected - keys)
                    record["lost"] = lost
                    if lost or closing != args.entries:
                        record["failure"] = "%d of %d restored entries lost" % (lost, args.entries)
                else:
                    families = families_of(copy)
                    live = [f for f in families if f.get("revoked_at") is None]
                    record["families_after_cut"] = len(families)
                    record["live_after_cut"] = len(live)
                    if len(families) != args.entries or live:
                        record["failure"] = "%d families, %d of them still live after an " \
                            "answered revoke" % (len(families), len(live))
            finally:
                after.unmount()
        if "failure" in record:
            failures += 1
        print(json.dumps(record), flush=True)
    print(json.dumps({"scenario": args.scenario, "rounds": args.rounds, "failed": failures,
                      "wxauth": wxauth}), flush=True)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
