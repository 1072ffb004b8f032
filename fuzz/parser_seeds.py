#!/usr/bin/env python3
"""Writes the seed corpora of the parser fuzz targets, api_http and snapshot_state
(fuzz/corpus/<target>/seed-*). Input formats: the top of fuzz_targets/api_http.rs and
fuzz_targets/snapshot_state.rs.

    python3 fuzz/parser_seeds.py [STATE]

STATE is a snapshot state file (DIR/state from `ferrovisor ctl snapshot DIR`); without it the
committed corpus/snapshot_state/seed-real-emu is used. The other snapshot seeds are derived
from its JSON, so after a change to `Snapshot` or the device states take a new snapshot and
run this again (`SNAPSHOT_FUZZ_TRACE=1 fuzz/target/<host>/release/snapshot_state
fuzz/corpus/snapshot_state/seed-*` says which seeds are accepted). corpus/snapshot_state/
seed-real-emu-older, a state from an older format, is not written here.
"""

import json
import os
import struct
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BODY = 1 << 20
MAX_HEADER = 16 << 10


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------
# api_http: byte 0 flags (bit 0 alone: keep the connection open; bit 1: expand, bit 2: by 32
# bytes), then bytes.

def req(method, target, body=None, headers=(), length=True):
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "User-Agent: ferrovisor-ctl"]
    lines += list(headers)
    b = b""
    if body is not None:
        b = body.encode() if isinstance(body, str) else body
        lines.append("Content-Type: application/json")
        if length:
            lines.append(f"Content-Length: {len(b)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + b


def closed(data):
    return b"\x00" + data


def kept_open(data):
    return b"\x01" + data


def expanded(before, pad_len, filler, after):
    """`before` + pad_len filler bytes + `after` (pad_len under 64 KiB or a multiple of 32)."""
    flags, count = (0x02, pad_len) if pad_len <= 0xFFFF else (0x06, pad_len // 32)
    assert count <= 0xFFFF and (flags == 0x02 or pad_len % 32 == 0)
    return (bytes([flags]) + struct.pack("<H", count) + bytes([filler])
            + struct.pack("<H", len(before)) + before + after)


def api_seeds():
    t = "api_http"
    write(t, "ping", closed(req("GET", "/api/v1/vmm/ping")))
    write(t, "info", closed(req("GET", "/api/v1/vm/info")))
    write(t, "info-query", closed(req("GET", "/api/v1/vm/info?pretty=1#x")))
    write(t, "config", closed(req("PUT", "/api/v1/vm/config", json.dumps(
        {"kernel": "/k/vmlinux", "memory": "512M", "cpus": 2, "cmdline": "console=ttyS0",
         "disks": [{"path": "/d.img", "ro": True}], "ratio": 0.5,
         "scale": 5.971697858821402e141}))))
    write(t, "start", closed(req("PUT", "/api/v1/vm/start", "")))
    write(t, "pause", closed(req("PUT", "/api/v1/vm/pause")))
    write(t, "resume-empty-object", closed(req("PUT", "/api/v1/vm/resume", " {} ")))
    write(t, "shutdown", closed(req("PUT", "/api/v1/vm/shutdown", '{"timeout_s": 10}')))
    write(t, "shutdown-no-body", closed(req("PUT", "/api/v1/vm/shutdown")))
    write(t, "kill", closed(req("PUT", "/api/v1/vm/kill", "{}")))
    write(t, "snapshot", closed(req("PUT", "/api/v1/vm/snapshot",
                                     '{"dir": "/tmp/snap", "diff": true}')))
    write(t, "restore", closed(req("PUT", "/api/v1/vm/restore", json.dumps(
        {"dir": "/tmp/snap", "resume": True,
         "overrides": {"disks": [{"path": "/d2.img"}], "nets": []}}))))
    write(t, "expect-continue", closed(req(
        "PUT", "/api/v1/vm/snapshot", None,
        ["Expect: 100-continue", "Content-Length: 20"])))
    # Malformed or refused.
    write(t, "bad-405", closed(req("POST", "/api/v1/vm/pause")))
    write(t, "bad-404", closed(req("GET", "/vm/info")))
    write(t, "bad-body-unknown-field", closed(req("PUT", "/api/v1/vm/snapshot",
                                                   '{"dir": "/s", "dif": true}')))
    write(t, "bad-body-on-action", closed(req("PUT", "/api/v1/vm/pause", '{"now": true}')))
    write(t, "bad-chunked", closed(req("PUT", "/api/v1/vm/config", None,
                                       ["Transfer-Encoding: chunked"]) + b"5\r\n{}{}{\r\n0\r\n\r\n"))
    write(t, "bad-two-lengths", closed(req("PUT", "/api/v1/vm/kill", None,
                                           ["Content-Length: 2", "content-length: 3"]) + b"{} "))
    write(t, "bad-length-nan", closed(req("PUT", "/api/v1/vm/kill", None,
                                          ["Content-Length: 0x10"])))
    write(t, "bad-413", closed(req("PUT", "/api/v1/vm/config", None,
                                   [f"Content-Length: {MAX_BODY + 1}"]) + b'{"a":1}'))
    write(t, "bad-garbage", closed(b"\x00\x01GET / HTTP/1.1\r\n\r\n"))
    write(t, "bad-lf-only", closed(b"GET /api/v1/vm/info HTTP/1.1\nHost: x\n\n"))
    write(t, "bad-closed-in-head", closed(b"GET /api/v1/vm/info HTTP/1.1\r\nHost: loc"))
    write(t, "bad-closed-in-body", closed(req("PUT", "/api/v1/vm/snapshot", None,
                                              ["Content-Length: 40"]) + b'{"dir": '))
    write(t, "bad-too-many-headers", closed(req("GET", "/api/v1/vm/info", None,
                                                [f"X-H{i}: {i}" for i in range(33)])))
    write(t, "open-in-body", kept_open(req("PUT", "/api/v1/vm/config", None,
                                           ["Content-Length: 100"]) + b'{"kernel": '))
    write(t, "open-complete", kept_open(req("GET", "/api/v1/vmm/ping")))
    # Limits: a head just over MAX_HEADER_BYTES, a body of exactly MAX_BODY_BYTES (accepted),
    # a body one byte longer.
    head = b"GET /api/v1/vm/info HTTP/1.1\r\nX-Long: "
    write(t, "big-header", expanded(head, MAX_HEADER, ord("a"), b"\r\n\r\n"))
    head = b"PUT /api/v1/vm/config HTTP/1.1\r\nContent-Length: %d\r\n\r\n{\"a\":\"" % MAX_BODY
    pad = (MAX_BODY - 8) // 32 * 32
    write(t, "body-at-limit", expanded(head, pad, ord("x"),
                                       b"x" * (MAX_BODY - 8 - pad) + b'"}'))
    head = (b"PUT /api/v1/vm/config HTTP/1.1\r\nContent-Length: %d\r\n\r\n{\"a\":\""
            % (MAX_BODY + 1))
    write(t, "body-over-limit", expanded(head, pad, ord("x"),
                                         b"x" * (MAX_BODY - 7 - pad) + b'"}'))


# ---------------------------------------------------------------------------------------
# snapshot_state: byte 0 fix-ups (bit 1: set the length, bit 0: set the CRC), then the file.

def state_file(body, version=1, length=None, crc=None):
    length = len(body) if length is None else length
    crc = zlib.crc32(body) if crc is None else crc
    return b"FVSNAPST" + struct.pack("<IQI", version, length, crc) + body


def snapshot_seeds(state_path):
    t = "snapshot_state"
    if state_path:
        with open(state_path, "rb") as f:
            real = f.read()
        write(t, "real-emu", b"\x00" + real)
    else:
        with open(os.path.join(HERE, "corpus", t, "seed-real-emu"), "rb") as f:
            real = f.read()[1:]
    assert real[:8] == b"FVSNAPST", "not a state file"
    body = real[24:]
    snap = json.loads(body)
    enc = lambda v: json.dumps(v, separators=(",", ":")).encode()
    write(t, "real-emu-fixed", b"\x03" + real)

    # A small one: opaque back-end states cut down to a field each.
    small = json.loads(body)
    small["vm"]["state"] = {"clock": {"mode": "host", "now_ns": 1}}
    small["vcpus"] = [{"backend": small["backend"], "state": {"rip": 4096, "x": [1, 2.5]}}]
    small["devices"]["pci"] = {"latch": 2147483648}
    small["config"]["kernel"] = "/k"
    write(t, "small", b"\x03" + state_file(enc(small)))
    # A diff snapshot with two vCPUs and virtio devices.
    diff = json.loads(enc(small))
    diff["memory"]["diff"] = {"parent": "/snapshots/base", "runs": [[0, 1], [5, 3]]}
    diff["vcpus"] = diff["vcpus"] * 2
    diff["devices"]["virtio"] = [{"kind": "block", "queues": [{"size": 256}]},
                                 {"kind": "rng"}]
    diff["memory"]["regions"].append({"guest_addr": 1 << 32, "len": 4096,
                                      "file_offset": diff["memory"]["file_len"]})
    diff["memory"]["file_len"] += 4096
    write(t, "diff", b"\x03" + state_file(enc(diff)))
    # Refusals, with the header as given.
    good = state_file(enc(small))
    write(t, "bad-short-magic", b"\x00FVSN")
    write(t, "bad-magic", b"\x00FVSNAPSHOT and more")
    write(t, "bad-short-header", b"\x00" + good[:15])
    write(t, "bad-version", b"\x00" + state_file(enc(small), version=2))
    write(t, "bad-huge-length", b"\x00" + state_file(enc(small), length=(256 << 20) + 1))
    write(t, "bad-truncated", b"\x00" + good[:-1])
    write(t, "bad-crc", b"\x00" + state_file(enc(small), crc=zlib.crc32(enc(small)) ^ 1))
    write(t, "trailing-bytes", b"\x00" + good + b"\x00garbage after the body")
    write(t, "bad-not-json", b"\x03" + state_file(b"{\"ferrovisor_version\": \"0.1"))
    unknown = json.loads(enc(small))
    unknown["extra"] = True
    write(t, "bad-unknown-field", b"\x03" + state_file(enc(unknown)))


def main():
    api_seeds()
    snapshot_seeds(sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
