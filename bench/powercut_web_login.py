#!/usr/bin/env python3
"""Power-cut rounds for web login's sessions, on the powercut harness.

    /tmp/powercut-venv/bin/python bench/powercut_web_login.py ROUNDS --minutes 5 \\
        --powercut ../shared/tools/powercut --wxauth target/release/wxauth \\
        --workdir /tmp/powercut-web-login

Uses the pieces of the powercut harness in DIR (--powercut, or $POWERCUT_DIR;
default ../shared/tools/powercut from the project root): powercutfs through
harness.Mount, and loop.py's Server and Client, with a load of its own. Each round: client threads
each log a phone user in (the mock), then, per web login, ask for a ticket,
scan it, confirm it with the phone's access token, and poll for the web tokens;
half of the collected web sessions are refreshed once. At a random moment
wxauth is stopped, the power cut (every un-fsynced write dropped), wxauth killed,
the file system remounted and wxauth restarted; then, for every claim the
clients were answered before the cut:

  * web_sessions_listed: every phone user with answered confirms lists (GET
    /api/weixin/sessions/ with the phone's access token) at least 1 + that many
    sessions, among them the family of every web login polled "confirmed";
  * web_refresh_works: the refresh token of every web login polled "confirmed"
    and never sent for refresh is refreshed (200): its family is durable;
  * web_rotated_new_works: the new refresh token of every answered web refresh
    is refreshed (200);
  * web_rotated_out_401: the token it replaced answers 401;
  * relogin: every answered phone login logs in again as the same user id.

A refresh sent but not answered before the cut is not checked (either outcome
is allowed). --lying-fsync data/db is the positive control: the checks must
then report losses. Results: WORKDIR/rounds.jsonl and WORKDIR/summary.json.
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import random
import shutil
import signal
import stat
import sys
import threading
import time

_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument('--powercut', default=os.environ.get('POWERCUT_DIR') or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'tools', 'powercut'))
POWERCUT = os.path.abspath(_pre.parse_known_args()[0].powercut)
sys.path.insert(0, POWERCUT)
from harness import Mount, is_mounted  # noqa: E402
import loop  # noqa: E402  (its Server and Client; its main() is not run)


class Client(loop.Client):
    """loop's keep-alive client, with an optional bearer token."""

    def call(self, method, path, body=None, bearer=None):
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=self.timeout)
            headers = {}
            if body is not None:
                headers['Content-Type'] = 'application/json'
            if bearer is not None:
                headers['Authorization'] = 'Bearer ' + bearer
            self.conn.request(method, path, body=json.dumps(body) if body is not None else None,
                              headers=headers)
            r = self.conn.getresponse()
            raw = r.read()
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = {'raw': raw[:200].decode('latin-1')}
            return r.status, data
        except (OSError, http.client.HTTPException) as e:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None, {'error': repr(e)}


def family_of(token):
    import base64
    payload = token.split('.')[1]
    payload += '=' * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))['fam']


class Ledger:
    def __init__(self):
        self.mu = threading.Lock()
        self.phones = {}      # name -> {'id', 'access', 'confirms': answered confirms, 'fams': polled families}
        self.web = []         # polled "confirmed": {'name', 'refresh', 'fam', 'refresh_sent', 'new'}
        self.statuses = {}

    def count(self, what, st):
        key = '%s %s' % (what, st)
        with self.mu:
            self.statuses[key] = self.statuses.get(key, 0) + 1


def web_worker(port, prefix, tid, stop, ledger, rng, logins_per_phone):
    c = Client(port)
    i = 0
    while not stop.is_set():
        name = '%st%dn%d' % (prefix, tid, i)
        i += 1
        st, body = c.call('POST', '/api/weixin/login/', {'code': name + '.x'})
        ledger.count('login', st)
        if st != 200:
            time.sleep(0.01)
            continue
        phone = {'id': body['user']['id'], 'access': body['access'], 'confirms': 0, 'fams': []}
        with ledger.mu:
            ledger.phones[name] = phone
        for _ in range(logins_per_phone):
            if stop.is_set():
                return
            st, t = c.call('POST', '/api/weixin/web-login/')
            ledger.count('ticket', st)
            if st != 200:
                break
            ticket, secret = t['ticket'], t['poll_secret']
            st, _ = c.call('POST', '/api/weixin/web-login/%s/scan' % ticket, bearer=phone['access'])
            ledger.count('scan', st)
            if st != 200:
                break
            st, _ = c.call('POST', '/api/weixin/web-login/%s/confirm' % ticket, bearer=phone['access'])
            ledger.count('confirm', st)
            if st != 200:
                break
            with ledger.mu:
                phone['confirms'] += 1
            st, polled = c.call('GET', '/api/weixin/web-login/%s/?wait=0' % ticket, bearer=secret)
            ledger.count('poll', st)
            if st != 200 or polled.get('status') != 'confirmed' or 'refresh' not in polled:
                break
            web = {'name': name, 'refresh': polled['refresh'], 'fam': family_of(polled['refresh']),
                   'refresh_sent': False, 'new': None}
            with ledger.mu:
                phone['fams'].append(web['fam'])
                ledger.web.append(web)
            if rng.random() < 0.5 and not stop.is_set():
                web['refresh_sent'] = True
                st, r = c.call('POST', '/api/token/refresh/', {'refresh': web['refresh']})
                ledger.count('web_refresh', st)
                if st == 200:
                    web['new'] = r['refresh']


def run_jobs(port, jobs, threads=3):
    """jobs: (kind, key, method, path, body, bearer, predicate) -> (counts, failures)."""
    local = threading.local()

    def one(job):
        kind, key, method, path, body, bearer, pred = job
        c = getattr(local, 'c', None)
        if c is None:
            c = local.c = Client(port)
        st, data = c.call(method, path, body, bearer)
        if st is None:   # a harness-side connection problem: retry once
            st, data = c.call(method, path, body, bearer)
        ok, why = pred(st, data)
        return kind, key, ok, why, st, data

    counts, failures = {}, []
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        for kind, key, ok, why, st, data in ex.map(one, jobs):
            counts.setdefault(kind, [0, 0])
            counts[kind][0 if ok else 1] += 1
            if not ok:
                failures.append({'check': kind, 'key': key, 'why': why, 'status': st,
                                 'body': json.dumps(data)[:300]})
    return counts, failures


def status_is(want):
    return lambda st, data: (True, '') if st == want else (False, 'expected %s, got %s' % (want, st))


def lists_sessions(at_least, fams):
    def pred(st, data):
        if st != 200:
            return False, 'sessions answered %s' % st
        ids = {s['id'] for s in data.get('sessions', [])}
        missing = [f for f in fams if f not in ids]
        if missing:
            return False, 'web families missing: %s' % missing
        if len(ids) < at_least:
            return False, '%d sessions, at least %d answered' % (len(ids), at_least)
        return True, ''
    return pred


def same_user(uid):
    def pred(st, data):
        if st != 200:
            return False, 'login answered %s' % st
        user = data.get('user', {})
        if user.get('id') != uid or user.get('created') is not False:
            return False, 'user %s created=%s, was %s' % (user.get('id'), user.get('created'), uid)
        return True, ''
    return pred


def checks(port, ledger):
    # 1. sessions first: nothing below has revoked a family yet
    jobs = [('web_sessions_listed', n, 'GET', '/api/weixin/sessions/', None, p['access'],
             lists_sessions(1 + p['confirms'], p['fams']))
            for n, p in ledger.phones.items() if p['confirms']]
    c1, f1 = run_jobs(port, jobs)
    # 2. current refresh tokens of the web families work
    jobs = [('web_refresh_works', w['fam'], 'POST', '/api/token/refresh/', {'refresh': w['refresh']}, None,
             status_is(200)) for w in ledger.web if not w['refresh_sent']]
    jobs += [('web_rotated_new_works', w['fam'], 'POST', '/api/token/refresh/', {'refresh': w['new']}, None,
              status_is(200)) for w in ledger.web if w['new']]
    c2, f2 = run_jobs(port, jobs)
    # 3. the rotated-out ones are dead
    jobs = [('web_rotated_out_401', w['fam'], 'POST', '/api/token/refresh/', {'refresh': w['refresh']}, None,
             status_is(401)) for w in ledger.web if w['new']]
    c3, f3 = run_jobs(port, jobs)
    # 4. every answered phone login is durable
    jobs = [('relogin', n, 'POST', '/api/weixin/login/', {'code': n + '.check'}, None, same_user(p['id']))
            for n, p in ledger.phones.items()]
    c4, f4 = run_jobs(port, jobs)
    counts = {}
    for c in (c1, c2, c3, c4):
        counts.update(c)
    return counts, f1 + f2 + f3 + f4


def write_wrapper(path, binary):
    with open(path, 'w') as f:
        f.write('#!/bin/sh\n'
                '# wxauth for the web login power-cut rounds: web login on, refresh limits off\n'
                'export WXAUTH_WEB_LOGIN__ENABLED=true\n'
                'export WXAUTH_LIMITS__REFRESH_PER_MINUTE=0\n'
                'export WXAUTH_LIMITS__REFRESH_PER_FAMILY_PER_MINUTE=0\n'
                'exec %s "$@"\n' % json.dumps(binary))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('rounds', type=int)
    ap.add_argument('--powercut', metavar='DIR', default=POWERCUT,
                    help='the powercut harness (harness.py, powercutfs.py, loop.py)')
    ap.add_argument('--minutes', type=float, default=None)
    ap.add_argument('--threads', type=int, default=4)
    ap.add_argument('--workdir', default='/tmp/powercut-web-login')
    ap.add_argument('--wxauth', default='target/release/wxauth')
    ap.add_argument('--cut-min', type=float, default=0.05)
    ap.add_argument('--cut-max', type=float, default=3.0)
    ap.add_argument('--rounds-per-db', type=int, default=30)
    ap.add_argument('--web-logins-per-phone', type=int, default=2)
    ap.add_argument('--fsync-delay-ms', type=float, default=2.0)
    ap.add_argument('--lying-fsync', metavar='REGEX', default=None,
                    help='POSITIVE CONTROL: fsync of matching files is acknowledged and not kept')
    ap.add_argument('--seed', type=int, default=None)
    ap.add_argument('--start-timeout', type=float, default=90)
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else int(time.time())
    rng = random.Random(seed)
    W = os.path.abspath(a.workdir)
    os.makedirs(W, exist_ok=True)
    wrapper = os.path.join(W, 'wxauth-web-login.sh')
    write_wrapper(wrapper, os.path.abspath(a.wxauth))
    backing, mnt = os.path.join(W, 'backing'), os.path.join(W, 'mnt')
    sock, fslog, logs = os.path.join(W, 'ctl.sock'), os.path.join(W, 'powercutfs.log'), os.path.join(W, 'logs')
    data_dir = os.path.join(mnt, 'data')
    os.makedirs(logs, exist_ok=True)
    rounds_path = os.path.join(W, 'rounds.jsonl')
    open(rounds_path, 'w').close()
    if is_mounted(mnt):
        sys.exit('%s is mounted already (another run?)' % mnt)
    print('powercut-web-login: seed %d, workdir %s, threads %d%s' % (
        seed, W, a.threads, ', POSITIVE CONTROL: lying fsync for %s' % a.lying_fsync if a.lying_fsync else ''),
        flush=True)

    state = {'mount': None, 'server': None}
    instance = [0]
    totals = {'rounds': 0, 'phone_logins': 0, 'confirms': 0, 'web_tokens': 0, 'web_rotations': 0,
              'checks': {}, 'failed_rounds': [], 'open_failures': 0, 'databases': 0, 'seed': seed,
              'statuses': {}, 'config': vars(a)}
    t_begin = time.time()

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    def mount():
        return Mount(backing, mnt, sock, fslog, direct_io=True, fsync_delay_ms=a.fsync_delay_ms,
                     lying_fsync=a.lying_fsync)

    def new_server():
        instance[0] += 1
        return loop.Server(wrapper, data_dir, os.path.join(logs, 'wxauth-%04d.log' % instance[0]), cwd=W)

    rounds_in_db = a.rounds_per_db
    try:
        for rnd in range(1, a.rounds + 1):
            if a.minutes is not None and time.time() - t_begin > a.minutes * 60:
                print('powercut-web-login: time budget reached after %d rounds' % (rnd - 1), flush=True)
                break
            if state['server'] is None or rounds_in_db >= a.rounds_per_db:
                if state['server'] is not None:
                    state['server'].kill()
                    state['mount'].unmount()
                shutil.rmtree(backing, ignore_errors=True)
                os.makedirs(backing)
                state['mount'] = mount()
                state['server'] = new_server()
                if not state['server'].wait_ready(a.start_timeout):
                    raise RuntimeError('wxauth did not start on an empty database: %s'
                                       % state['server'].log_lines())
                totals['databases'] += 1
                rounds_in_db = 0
            rounds_in_db += 1
            srv, m = state['server'], state['mount']
            ledger, stop = Ledger(), threading.Event()
            prefix = 'w%dr%d' % (totals['databases'], rnd)
            workers = [threading.Thread(target=web_worker, daemon=True,
                                        args=(srv.port, prefix, t, stop, ledger, random.Random(rng.random()),
                                              a.web_logins_per_phone))
                       for t in range(a.threads)]
            cut_at = rng.uniform(a.cut_min, a.cut_max)
            for w in workers:
                w.start()
            time.sleep(cut_at)
            srv.signal(signal.SIGSTOP)
            stop.set()
            cut = m.cut()
            srv.kill()
            for w in workers:
                w.join(timeout=30)
            m.unmount()
            state['mount'] = state['server'] = None

            m = state['mount'] = mount()
            srv = state['server'] = new_server()
            rec = {'round': rnd, 'db': totals['databases'], 'cut_after_s': round(cut_at, 3),
                   'phone_logins': len(ledger.phones),
                   'confirms': sum(p['confirms'] for p in ledger.phones.values()),
                   'web_tokens': len(ledger.web), 'web_rotations': sum(1 for w in ledger.web if w['new']),
                   'statuses': ledger.statuses, 'dropped_write_bytes': cut['dropped_write_bytes'],
                   'dropped_db_write_bytes': cut['dropped_files'].get('data/db', {}).get('write_bytes', 0)}
            failures = []
            if not srv.wait_ready(a.start_timeout):
                failures.append({'check': 'open', 'why': 'wxauth did not start (exit %s)' % srv.proc.poll(),
                                 'log': srv.log_lines(40)})
                totals['open_failures'] += 1
                srv.kill()
                m.unmount()
                state['mount'] = state['server'] = None
                counts = {}
            else:
                time.sleep(1.2)
                counts, fs = checks(srv.port, ledger)
                failures += fs
            rec['checks'], rec['failures'] = counts, failures[:20]
            for k, (okc, bad) in counts.items():
                totals['checks'].setdefault(k, [0, 0])
                totals['checks'][k][0] += okc
                totals['checks'][k][1] += bad
            for k, v in ledger.statuses.items():
                totals['statuses'][k] = totals['statuses'].get(k, 0) + v
            totals['rounds'] += 1
            for k in ('phone_logins', 'confirms', 'web_tokens', 'web_rotations'):
                totals[k] += rec[k]
            if failures:
                totals['failed_rounds'].append({'round': rnd, 'n_failures': len(failures),
                                                'failures': failures[:5]})
            with open(rounds_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
            print('round %4d db %d cut@%.2fs: %4d phone logins, %4d confirms, %4d web tokens, %4d web rotations;'
                  ' dropped %7d B (db %6d B); checks %s; %s'
                  % (rnd, totals['databases'], cut_at, rec['phone_logins'], rec['confirms'], rec['web_tokens'],
                     rec['web_rotations'], cut['dropped_write_bytes'], rec['dropped_db_write_bytes'],
                     ' '.join('%s=%d/%d' % (k, v[0], v[0] + v[1]) for k, v in sorted(counts.items())),
                     ('%d FAILURES' % len(failures)) if failures else 'ok'), flush=True)
            if not counts:
                rounds_in_db = a.rounds_per_db   # a fresh database next round
    finally:
        if state['server'] is not None:
            state['server'].stop()
        if state['mount'] is not None:
            state['mount'].unmount()
        totals['wall_s'] = round(time.time() - t_begin, 1)
        totals['failed_checks'] = sum(v[1] for v in totals['checks'].values())
        with open(os.path.join(W, 'summary.json'), 'w') as f:
            json.dump(totals, f, indent=1)
        print('powercut-web-login: SUMMARY ' + json.dumps({k: v for k, v in totals.items()
                                                          if k not in ('failed_rounds', 'config')}), flush=True)
        print('powercut-web-login: %d failed rounds; details in %s'
              % (len(totals['failed_rounds']), os.path.join(W, 'summary.json')), flush=True)


if __name__ == '__main__':
    main()
