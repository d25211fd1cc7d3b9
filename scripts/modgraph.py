#!/usr/bin/env python3
"""The crate's module graph, from the `crate::`, `super::` and `self::` paths in src/.

Prints each import cycle between files (strongly connected components of more than
one file) and each import from a lower layer to a higher one, by the layer table in
docs/ARCHITECTURE.md ("Layers"), repeated in LAYERS below. Exits 1 if it finds either.

    python3 scripts/modgraph.py [--edges] [--src DIR]
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
if "--src" in sys.argv:
    SRC = sys.argv[sys.argv.index("--src") + 1]

# Lowest first. A file may import its own layer and the ones below it, never a
# higher one; no two files may import each other, directly or through others.
# A module belongs to the layer of the longest name here that is it or its parent.
LAYERS = [
    ("leaf", ["clock", "ids", "cause", "secret", "fsutil", "ratelimit", "wechat_crypto"]),
    ("config", ["postgres_url", "config", "tls", "telemetry"]),
    ("store", ["storage", "storage::sled"]),
    ("records", ["users", "wechat", "metrics", "events", "web_login"]),
    ("model", ["storage::model", "storage::sled_model", "storage::upgrade", "storage::postgres", "users::cache"]),
    ("tokens", ["tokens", "users::export", "storage::postgres::keys"]),
    ("actors", ["actors"]),
    ("http", ["http"]),
    ("admin", ["admin"]),
    ("app", ["startup", "cli", "lib", "main"]),
]


UNLAYERED = set()


def layer_of(module):
    best, layer = "", None
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + "::")) and len(n) > len(best):
                best, layer = n, i
    if layer is None:
        UNLAYERED.add(module)
        return len(LAYERS) - 1
    return layer


def module_files():
    mods = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), SRC)
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]):
                name = parts[0]
            else:
                name = "::".join(parts)
            mods[name] = os.path.join("src", rel)
    return mods


def strip(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    text = re.sub(r"'(\\.|[^'\\])'", "' '", text)
    # Test modules are not part of the graph.
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{", text)
        if not m:
            return text
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        text = text[: m.start()] + text[i:]


def expand_use(prefix, body):
    """`a::{b, c::{d, e}}` under `prefix` -> every full path."""
    out = []
    depth, start = 0, 0
    items = []
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    items.append(body[start:])
    for item in items:
        item = item.strip()
        if not item:
            continue
        m = re.match(r"^([\w:]*?)(::)?\{(.*)\}$", item, flags=re.S)
        if m:
            out += expand_use(prefix + [p for p in m.group(1).split("::") if p], m.group(3))
        else:
            item = re.split(r"\s+as\s+", item)[0]
            out.append(prefix + [p for p in item.split("::") if p])
    return out


def resolve(path, here, mods):
    """A path's longest prefix that is a module file, or the crate root."""
    for n in range(len(path), 0, -1):
        name = "::".join(path[:n])
        if name in mods:
            return name
    return "lib" if here != "lib" else None


def edges(mods):
    out = {}
    for name, file in mods.items():
        text = strip(open(os.path.join(SRC, os.path.relpath(file, "src"))).read())
        base = [] if name in ("lib", "main") else name.split("::")
        paths = []
        for m in re.finditer(r"\buse\s+((?:crate|super|self)(?:::\w+)*)(::\{(.*?)\})?\s*;", text, flags=re.S):
            head = m.group(1).split("::")
            if m.group(3) is not None:
                paths += expand_use(head, m.group(3))
            else:
                paths.append(head)
        for m in re.finditer(r"(?<![\w:])((?:crate|super|self)(?:::\w+)+)", text):
            paths.append(m.group(1).split("::"))
        deps = set()
        for p in paths:
            if p[0] == "crate":
                full = p[1:]
            elif p[0] == "self":
                full = list(base) + p[1:]
            else:
                cur, k = list(base), 0
                while k < len(p) and p[k] == "super":
                    cur, k = cur[:-1], k + 1
                full = cur + p[k:]
            target = resolve(full, name, mods)
            if target and target != name and target != "main":
                deps.add(target)
        out[name] = deps
    return out


def sccs(graph):
    index, low, stack, on, res = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            res.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in res if len(c) > 1]


def main():
    mods = module_files()
    graph = edges(mods)
    # `lib` declares every top-level module: that is not an import.
    graph["lib"] = {d for d in graph["lib"] if False} | {
        d for d in edges_lib_imports(mods)
    }
    if "--edges" in sys.argv:
        for a in sorted(graph):
            for b in sorted(graph[a]):
                print(f"{a} -> {b}")
    bad = 0
    cycles = sccs(graph)
    for c in cycles:
        bad += 1
        print(f"cycle ({len(c)} files): " + ", ".join(c))
    for a in sorted(graph):
        for b in sorted(graph[a]):
            if layer_of(b) > layer_of(a):
                bad += 1
                print(f"upward: {a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})")
    for m in sorted(UNLAYERED):
        bad += 1
        print(f"no layer: {m} (add it to LAYERS)")
    n_edges = sum(len(v) for v in graph.values())
    print(f"{len(mods)} files, {n_edges} imports between them, {len(cycles)} cycles, "
          f"{bad - len(cycles) - len(UNLAYERED)} upward imports")
    sys.exit(1 if bad else 0)


def edges_lib_imports(mods):
    """What lib.rs itself uses (its `pub use` re-exports), not its `mod` lines."""
    text = strip(open(os.path.join(SRC, "lib.rs")).read())
    deps = set()
    for m in re.finditer(r"\buse\s+crate((?:::\w+)*)(::\{(.*?)\})?\s*;", text, flags=re.S):
        head = ["crate"] + [p for p in m.group(1).split("::") if p]
        paths = expand_use(head, m.group(3)) if m.group(3) is not None else [head]
        for p in paths:
            t = resolve(p[1:], "lib", mods)
            if t:
                deps.add(t)
    return deps


if __name__ == "__main__":
    main()
