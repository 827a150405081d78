#!/usr/bin/env python3
"""Small stdlib-only helpers for ci/bench.

Subcommands:
  freeport                     print an unused TCP port on 127.0.0.1
  gen-image DIR --layers N --layer-size BYTES --info FILE
                               write an OCI image layout (random tar layers)
  spawn --log F --url U -- CMD start CMD detached, wait for HTTP 200 on U,
                               print "PID STARTUP_MS"
  cpu PID                      CPU seconds (utime+stime) of PID and descendants
  mem FIELD PID                /proc status FIELD (VmHWM, VmRSS) in KiB, summed
                               over PID and descendants
  wrk FILE                     parse wrk --latency output
  ab FILE                      parse ab output
  report RESULTS               print the summary table
"""

import argparse
import hashlib
import io
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import time

CHUNK = 1 << 20


# --------------------------------------------------------------------------
# ports / processes


def cmd_measure(args):
    """Run a command; print its wall seconds and peak RSS in KiB (children included)."""
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    t0 = time.perf_counter()
    with open(args.log, "ab") as log:
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"{wall:.4f} {rss}")
    sys.exit(rc)


def cmd_freeport(_args):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def http_status(host, port, path, timeout=1.0):
    """Return the status code of GET path, or None if not reachable."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
            s.sendall(req.encode())
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            line = buf.split(b"\r\n", 1)[0].split()
            if len(line) >= 2 and line[1].isdigit():
                return int(line[1])
            return -1
    except OSError:
        return None


def cmd_spawn(args):
    m = re.match(r"^https?://([^/:]+):(\d+)(/.*)?$", args.url)
    if not m:
        sys.exit(f"spawn: bad url {args.url}")
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        sys.exit("spawn: no command")
    log = open(args.log, "ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = t0 + args.timeout
    last = None
    while True:
        last = http_status(host, port, path)
        if last == 200:
            ms = (time.perf_counter() - t0) * 1000.0
            print(f"{proc.pid} {ms:.1f}")
            return
        if proc.poll() is not None:
            sys.stderr.write(
                f"spawn: {cmd[0]} exited with {proc.returncode} before answering {args.url}\n"
            )
            break
        if time.perf_counter() > deadline:
            sys.stderr.write(f"spawn: {args.url} not 200 after {args.timeout}s (last: {last})\n")
            proc.kill()
            break
        time.sleep(0.001)
    log.close()
    try:
        with open(args.log, "rb") as f:
            tail = f.read()[-3000:]
        sys.stderr.write("---- log tail ----\n" + tail.decode(errors="replace") + "\n")
    except OSError:
        pass
    sys.exit(1)


def children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def process_tree(pid):
    kids = children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cmd_cpu(args):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(args.pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state); utime/stime are fields 14/15.
        total += int(fields[11]) + int(fields[12])
    print(f"{total / tick:.2f}")


def cmd_mem(args):
    total = 0
    for p in process_tree(args.pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(args.field + ":"):
                        total += int(line.split()[1])
        except OSError:
            continue
    print(total)


# --------------------------------------------------------------------------
# OCI image layout generation


class RandomReader(io.RawIOBase):
    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def read(self, n=-1):
        if self.left <= 0:
            return b""
        if n is None or n < 0 or n > self.left:
            n = self.left
        n = min(n, CHUNK * 4)
        self.left -= n
        return os.urandom(n)


class HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f = f
        self.h = hashlib.sha256()
        self.size = 0

    def writable(self):
        return True

    def tell(self):
        return self.size

    def write(self, b):
        self.h.update(b)
        self.size += len(b)
        return self.f.write(b)


def write_blob(blobs, data):
    dgst = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, dgst), "wb") as f:
        f.write(data)
    return "sha256:" + dgst, len(data)


def cmd_gen_image(args):
    out = args.dir
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    layers = []
    for i in range(args.layers):
        tmp = os.path.join(blobs, f".tmp-layer-{i}")
        with open(tmp, "wb") as raw:
            hw = HashingWriter(raw)
            with tarfile.open(fileobj=hw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(f"data/layer-{i}.bin")
                info.size = args.layer_size
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, RandomReader(args.layer_size))
        dgst = hw.h.hexdigest()
        os.rename(tmp, os.path.join(blobs, dgst))
        # Uncompressed layer: digest == diff_id.
        layers.append(("sha256:" + dgst, hw.size))

    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "ci/bench"} for _ in layers],
    }
    cfg_d, cfg_n = write_blob(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cfg_d,
            "size": cfg_n,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n}
            for d, n in layers
        ],
        "annotations": {"org.opencontainers.image.title": os.path.basename(out.rstrip("/"))},
    }
    man_bytes = json.dumps(manifest, indent=2).encode()
    man_d, man_n = write_blob(blobs, man_bytes)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": man_d,
                "size": man_n,
                "annotations": {"org.opencontainers.image.ref.name": args.tag},
            }
        ],
    }
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(args.info, "w") as f:
        f.write(f"manifest {man_d} {man_n}\n")
        f.write(f"config {cfg_d} {cfg_n}\n")
        for d, n in layers:
            f.write(f"layer {d} {n}\n")


# --------------------------------------------------------------------------
# tool output parsing

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def cmd_wrk(args):
    text = open(args.file, errors="replace").read()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    total = re.search(r"(\d+) requests in", text)
    errs = sum(int(x) for x in sock.groups()) if sock else 0
    print(
        rps.group(1) if rps else "nan",
        f"{float(p99.group(1)) * UNITS[p99.group(2)]:.3f}" if p99 else "nan",
        non2xx.group(1) if non2xx else 0,
        errs,
        total.group(1) if total else 0,
    )


def cmd_ab(args):
    text = open(args.file, errors="replace").read()
    rps = re.search(r"Requests per second:\s+([\d.]+)", text)
    p99 = re.search(r"^\s*99%\s+(\d+)", text, re.M)
    failed = re.search(r"Failed requests:\s+(\d+)", text)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", text)
    done = re.search(r"Complete requests:\s+(\d+)", text)
    keep = re.search(r"Keep-Alive requests:\s+(\d+)", text)
    print(
        rps.group(1) if rps else "nan",
        p99.group(1) if p99 else "nan",
        non2xx.group(1) if non2xx else 0,
        failed.group(1) if failed else 0,
        done.group(1) if done else 0,
        keep.group(1) if keep else 0,
    )


# --------------------------------------------------------------------------
# report

SERVERS = ("berth", "distribution", "baseline")

# key, label, unit, higher_is_better, targets
# target kinds: ("dist", op, x) ratio berth/distribution; ("base", op, x)
# ratio berth/baseline; ("abs", op, x) berth's own value.
METRICS = [
    ("startup_ms", "start-up: spawn -> first 200 on /v2/", "ms", False, []),
    ("idle_rss_mib", "idle RSS right after start-up", "MiB", False, []),
    ("mget_tag_rps", "manifest GET by tag (baseline: nginx)", "req/s", True,
     [("dist", ">=", 20), ("base", ">=", 0.5)]),
    ("mget_tag_p99_ms", "manifest GET by tag p99", "ms", False, [("abs", "<", 10)]),
    ("mget_digest_rps", "manifest GET by digest (baseline: nginx)", "req/s", True,
     [("dist", ">=", 20), ("base", ">=", 0.5)]),
    ("mget_digest_p99_ms", "manifest GET by digest p99", "ms", False, [("abs", "<", 10)]),
    ("bhead_rps", "blob HEAD, ab -k -i -c64 (baseline: nginx)", "req/s", True, []),
    ("bhead_p99_ms", "blob HEAD p99 (ab, 1 ms resolution)", "ms", False, []),
    ("bget_c1_gbs", "blob GET {blob}, 1 client (baseline: nginx sendfile)", "GB/s", True,
     [("base", ">=", 0.9)]),
    ("bget_c4_gbs", "blob GET {blob}, 4 clients", "GB/s", True, [("base", ">=", 0.9)]),
    ("bget_c16_gbs", "blob GET {blob}, 16 clients", "GB/s", True, [("base", ">=", 0.9)]),
    ("push_gbs", "monolithic push {blob} (baseline: openssl sha256)", "GB/s", True,
     [("base", ">=", 0.8)]),
    ("push_durable_gbs", "monolithic push {blob} (baseline: dd conv=fdatasync)", "GB/s", True,
     [("base", ">=", 0.8)]),
    ("skopeo_push_big_s", "skopeo push {big}", "s", False, [("dist", "<=", 0.8)]),
    ("skopeo_push_small_s", "skopeo push {small}", "s", False, [("dist", "<=", 0.8)]),
    ("skopeo_pull_big_s", "skopeo pull {big}", "s", False, [("dist", "<=", 1.0)]),
    ("skopeo_pull_small_s", "skopeo pull {small}", "s", False, [("dist", "<=", 1.0)]),
    ("pull_cpu_big_s", "server CPU during pull {big}", "cpu-s", False, [("dist", "<=", 0.5)]),
    ("pull_cpu_small_s", "server CPU during pull {small}", "cpu-s", False, [("dist", "<=", 0.5)]),
    ("peak_rss_mib", "peak RSS (VmHWM) over the bench", "MiB", False, [("dist", "<=", 0.25)]),
]


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def check(op, value, limit):
    return {"<": value < limit, "<=": value <= limit, ">=": value >= limit, ">": value > limit}[op]


def cmd_report(args):
    samples = {}
    errors = set()
    with open(args.results) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            metric, server, _round, value = parts
            if value == "ERR":
                errors.add((metric, server))
                continue
            try:
                samples.setdefault((metric, server), []).append(float(value))
            except ValueError:
                errors.add((metric, server))

    def med(metric, server):
        vals = samples.get((metric, server))
        if vals:
            return statistics.median(vals)
        if (metric, server) in errors:
            return "ERR"
        return None

    labels = {k: v for k, v in (kv.split("=", 1) for kv in args.label)}
    header = ["metric", "unit", "berth", "distribution", "baseline",
              "berth/dist", "berth/base", "target", "ok?"]
    rows = []
    failures = 0
    for key, label, unit, _hib, targets in METRICS:
        label = label.format(**labels)
        b, d, n = (med(key, s) for s in SERVERS)
        if b is None and d is None and n is None:
            continue
        r_d = b / d if isinstance(b, float) and isinstance(d, float) and d else None
        r_n = b / n if isinstance(b, float) and isinstance(n, float) and n else None
        tdesc, verdicts = [], []
        for kind, op, x in targets:
            name = {"dist": "x dist", "base": "x base", "abs": f" {unit}"}[kind]
            tdesc.append(f"{op}{x:g}{name}")
            val = {"dist": r_d, "base": r_n, "abs": b if isinstance(b, float) else None}[kind]
            if val is None:
                verdicts.append("n/a" if b != "ERR" else "FAIL")
            else:
                verdicts.append("PASS" if check(op, val, x) else "FAIL")
        verdict = "-"
        if verdicts:
            verdict = "FAIL" if "FAIL" in verdicts else ("n/a" if "n/a" in verdicts else "PASS")
            failures += verdict == "FAIL"
        rows.append([
            label, unit, fmt(b), fmt(d), fmt(n),
            f"{r_d:.2f}x" if r_d is not None else "-",
            f"{r_n:.2f}x" if r_n is not None else "-",
            ", ".join(tdesc) or "-", verdict,
        ])
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    right = {2, 3, 4, 5, 6}

    def line(r):
        return "  ".join(
            str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
            for i, c in enumerate(r)
        ).rstrip()

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print()
    print(f"values are medians over {args.rounds} round(s); "
          f"targets missed: {failures}")


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("freeport").set_defaults(fn=cmd_freeport)

    p = sub.add_parser("gen-image")
    p.add_argument("dir")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--layer-size", type=int, required=True)
    p.add_argument("--tag", default="latest")
    p.add_argument("--info", required=True)
    p.set_defaults(fn=cmd_gen_image)

    p = sub.add_parser("spawn")
    p.add_argument("--log", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_spawn)

    p = sub.add_parser("measure")
    p.add_argument("--log", required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_measure)

    p = sub.add_parser("cpu")
    p.add_argument("pid", type=int)
    p.set_defaults(fn=cmd_cpu)

    p = sub.add_parser("mem")
    p.add_argument("field")
    p.add_argument("pid", type=int)
    p.set_defaults(fn=cmd_mem)

    for name, fn in (("wrk", cmd_wrk), ("ab", cmd_ab)):
        p = sub.add_parser(name)
        p.add_argument("file")
        p.set_defaults(fn=fn)

    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("--rounds", default="?")
    p.add_argument("--label", action="append", default=[])
    p.set_defaults(fn=cmd_report)

    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
