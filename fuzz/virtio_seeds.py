#!/usr/bin/env python3
"""Writes the hand-made seeds of the virtio fuzz targets into fuzz/corpus/<target>/seed-*.

    python3 fuzz/virtio_seeds.py

The input formats are described at the top of each target (fuzz/fuzz_targets/virtio_*.rs);
the helpers below mirror `ferrovisor_fuzz::virtio_kit::Desc` and the transport target's ops.
Each seed is a well-formed starting point (a read, a write, GET_ID through an indirect table,
a discard, a full driver set-up, ...) that the fuzzer then mutates.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def desc(addr, length, flags=0, nxt=0, big=False):
    """One descriptor in the 9-byte `Desc` encoding (address in the small regions unless
    `big`, length below 128 KiB, or `length >> 8` with bit 4)."""
    f = flags
    if big:
        a = 0x8000_0000 | ((addr - (1 << 32)) >> 1)
    else:
        a = addr
    if length >= 0x2_0000:
        assert length & 0xFF == 0
        f |= 0x10
        length >>= 8
    return bytes([f, nxt]) + struct.pack("<I", a) + struct.pack("<I", length)[:3]


def header(t, sector=0):
    return struct.pack("<IIQ", t, 0, sector)


def rng(sector, sectors, flags=0):
    return struct.pack("<QII", sector, sectors, flags)


def raw_desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def place(mem, at, data):
    if len(mem) < at + len(data):
        mem.extend(b"\0" * (at + len(data) - len(mem)))
    mem[at:at + len(data)] = data


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    assert len(data) <= 4096, (target, name, len(data))
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


# --- virtio_blk_request: n, max ranges, where memory goes, descriptors, memory ---------------

def request_seed(name, descs, max_ranges, memory):
    base = min(at for at, _ in memory)
    data = bytes([len(descs), max_ranges]) + struct.pack("<H", base) + b"".join(descs)
    mem = bytearray()
    for at, blob in memory:
        place(mem, at - base, blob)
    write("virtio_blk_request", name, data + bytes(mem))


request_seed("read", [desc(0x100, 16), desc(0x3F00, 512, WRITE), desc(0x200, 1, WRITE)], 1,
             [(0x100, header(T_IN, 7))])
request_seed("write-one-descriptor", [desc(0x100, 16 + 512), desc(0x300, 1, WRITE)], 1,
             [(0x100, header(T_OUT, 3) + bytes(range(256)) * 2)])
request_seed("split-header-and-status",
             [desc(0x3FF0, 8), desc(0x3FF8, 8 + 16), desc(0x400, 0, WRITE),
              desc(0x500, 33, WRITE)], 2,
             [(0x3FF0, header(T_DISCARD)[:8]), (0x3FF8, struct.pack("<Q", 9) + rng(1, 2))])
request_seed("discard-two-ranges", [desc(0x100, 48), desc(0x200, 1, WRITE)], 3,
             [(0x100, header(T_WRITE_ZEROES) + rng(0, 8, 1) + rng(64, 1))])
request_seed("get-id-across-hole", [desc(0x100, 16), desc(0x7FF0, 0x20, WRITE)], 0,
             [(0x100, header(T_GET_ID))])
request_seed("too-large",
             [desc(0x100, 16), desc((1 << 32) + 0x1000, 0x4000_0000, WRITE, big=True),
              desc((1 << 32) + 0x4000_2000, 0x100, WRITE, big=True)], 0,
             [(0x100, header(T_IN))])
request_seed("readable-after-writable",
             [desc(0x100, 16), desc(0x200, 1, WRITE), desc(0x300, 16)], 0,
             [(0x100, header(T_OUT))])


# --- virtio_blk_queue ---------------------------------------------------------------------

INDIRECT_AREA = 0x1000
DATA = 0x1200


def queue_seed(name, flags, sectors, start, table, rounds, memory, tail=0, serial=10, seed=0x5A):
    size = 1 << min((flags >> 3) & 7, 4)
    assert len(table) <= size
    table = table + [desc(0, 0)] * (size - len(table))
    out = bytes([flags, sectors - 1, tail]) + struct.pack("<H", start) + bytes([serial, seed])
    out += b"".join(table)
    out += bytes([len(rounds)])
    for used_event, heads in rounds:
        out += bytes([len(heads)]) + struct.pack("<H", used_event) + bytes(heads)
    mem = bytearray()
    for at, blob in memory:
        place(mem, at - INDIRECT_AREA, blob)
    write("virtio_blk_queue", name, out + bytes(mem))


STATUS = 0x6000
TABLE = [
    desc(0x1200, 16, NEXT, 1),                 # 0: read 1 KiB from sector 3 ...
    desc(0x3E00, 1024, WRITE | NEXT, 2),       # 1: ... into a buffer crossing two regions
    desc(STATUS, 1, WRITE),                    # 2
    desc(0x1210, 16 + 512, NEXT, 4),           # 3: write one sector (header + data)
    desc(STATUS + 1, 1, WRITE),                # 4
    desc(0, 48, INDIRECT),                     # 5: GET_ID through an indirect table
    desc(0x1430, 16, NEXT, 7),                 # 6: flush
    desc(STATUS + 3, 1, WRITE),                # 7
    desc(0x1440, 32, NEXT, 9),                 # 8: discard
    desc(STATUS + 4, 1, WRITE),                # 9
    desc(0x1460, 32, NEXT, 11),                # 10: write zeroes (unmap)
    desc(STATUS + 5, 1, WRITE),                # 11
    desc(0x1480, 16, NEXT, 13),                # 12: unknown type
    desc(STATUS + 6, 1, WRITE),                # 13
    desc(0x1200, 16),                          # 14: no status byte
    desc(0x1490, 16, NEXT, 1),                 # 15: a read past the end (via 1, 2)
]
MEMORY = [
    (INDIRECT_AREA, raw_desc(0x1420, 16, NEXT, 1) + raw_desc(0x6100, 20, WRITE | NEXT, 2)
     + raw_desc(STATUS + 7, 1, WRITE)),
    (0x1200, header(T_IN, 3)),
    (0x1210, header(T_OUT, 5) + bytes((i * 13) & 0xFF for i in range(512))),
    (0x1420, header(T_GET_ID)),
    (0x1430, header(T_FLUSH)),
    (0x1440, header(T_DISCARD) + rng(8, 2)),
    (0x1460, header(T_WRITE_ZEROES) + rng(10, 1, 1)),
    (0x1480, header(99)),
    (0x1490, header(T_IN, 127)),
]
ALL = [0, 3, 5, 6, 8, 10, 12, 14, 15]
SIZE16 = 4 << 3
queue_seed("strict-all-types", 0x04 | SIZE16, 128, 0xFFFE, TABLE,
           [(0, ALL), (0, [0, 200])], MEMORY)
queue_seed("batch-event-idx", 0x02 | SIZE16, 128, 0, TABLE,
           [(3, ALL), (0, [6, 3])], MEMORY)
queue_seed("read-only", 0x01 | 0x04 | SIZE16, 64, 0x7FFF, TABLE,
           [(0, ALL)], MEMORY, tail=100, serial=25)
# The vCPU tries first (`process_queue_now`): flush, discard and write-zeroes stay for the
# event loop, with everything after them.
VCPU_FIRST = 0x40
queue_seed("strict-vcpu-first", VCPU_FIRST | 0x04 | SIZE16, 128, 0xFFFE, TABLE,
           [(0, ALL), (0, [0, 200])], MEMORY)
queue_seed("batch-vcpu-first", VCPU_FIRST | 0x02 | SIZE16, 128, 0, TABLE,
           [(3, ALL), (0, [6, 3])], MEMORY)
queue_seed("size-one-wraps", 0x04, 8, 0xFFFF, [desc(0, 48, INDIRECT)],
           [(0, [0]), (0, [0]), (0, [0])], MEMORY, serial=24)
# Once bugs (fuzz/README.md), now regression seeds.
# Six chains made available on a queue of one: the available index runs ahead (the hang).
queue_seed("known-hang-index-ahead", 0x00, 8, 0, [desc(0, 48, INDIRECT)],
           [(0, [0] * 6)], MEMORY)
# A discard with the "unmap" flag, which virtio wants refused as unsupported.
queue_seed("known-discard-unmap", 0x04 | (1 << 3), 16, 0,
           [desc(0x1200, 32, NEXT, 1), desc(STATUS, 1, WRITE)], [(0, [0])],
           [(0x1200, header(T_DISCARD) + rng(1, 2, 1))])


# --- virtio_pci_transport -------------------------------------------------------------------
# Ops (see the target): 0 bar read, 1 bar write, 2 config read, 3 config write, 4 BAR moved,
# 5 set up the driver, 6 submit a request, 7 run the event loop, 8 poke MSI-X.

def op_setup(features_lo=0, features_hi=1, size=16, flags=0b111, cfg_vec=0, q_vec=1):
    return bytes([5]) + struct.pack("<IIHBHH", features_lo, features_hi, size, flags,
                                    cfg_vec, q_vec)


KINDS = [T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 99]


def op_submit(kind, sector, sectors, flags=1):
    return bytes([6, KINDS.index(kind), sector, sectors, flags])


def op_msix(entry, mask=False, function_mask=False, enable=True):
    return bytes([8, entry, int(mask) | int(function_mask) << 1 | int(enable) << 2])


def op_bar_moved(value):
    return bytes([4]) + struct.pack("<H", value)


def op_run():
    return bytes([7])


def op_bar_read(offset, size_code):
    return bytes([0]) + struct.pack("<HB", offset, size_code)


def op_bar_write(offset, size_code, value):
    return bytes([1]) + struct.pack("<HBQ", offset, size_code, value)


def transport_seed(name, ops, image_sectors=64, ro=0):
    write("virtio_pci_transport", name, bytes([image_sectors - 1, ro]) + b"".join(ops))


transport_seed("driver-read-write", [
    op_bar_moved(0x1FC0), op_setup(), op_submit(T_OUT, 2, 4), op_submit(T_IN, 2, 4), op_run(),
    op_bar_read(0x1000, 0), op_bar_read(0x1000, 0), op_bar_moved(0x1FD0), op_bar_moved(0),
])
transport_seed("event-idx-flush-get-id", [
    op_setup(features_lo=1 << 29, size=8), op_submit(T_FLUSH, 0, 0),
    op_submit(T_GET_ID, 0, 1), op_submit(T_DISCARD, 1, 1), op_run(),
])
transport_seed("indirect-masked-vector", [
    op_setup(features_lo=1 << 28, size=2), op_msix(1, mask=True), op_submit(T_WRITE_ZEROES, 3, 2, 3),
    op_submit(99, 0, 0), op_run(), op_msix(1), op_submit(T_IN, 3, 1), op_run(),
])
transport_seed("reset-and-again", [
    op_setup(), op_submit(T_IN, 0, 1), op_run(), op_bar_write(0x14, 0, 0),
    op_setup(size=4), op_submit(T_OUT, 63, 2), op_run(),
])
# Known bug: after a driver reset that leaves MSI-X alone, no interrupt arrives.
transport_seed("known-msix-after-reset", [
    op_setup(), op_submit(T_FLUSH, 0, 0), op_run(), op_setup(flags=0b110),
    op_submit(T_FLUSH, 0, 0), op_run(),
])
transport_seed("common-config-walk", [
    op_bar_write(0x16, 1, 0), op_bar_read(0x18, 1), op_bar_write(0x18, 1, 64),
    op_bar_write(0x20, 2, 0x1000), op_bar_write(0x1C, 1, 1), op_bar_write(0x14, 0, 0xF),
    op_bar_read(0x14, 0), op_bar_write(0x3000, 1, 0), op_run(),
])


# vsock_packet: count, CID selector, fill address, receive payload length, a 44-byte header
# for the receive test, descriptors, then memory (fuzz/fuzz_targets/vsock_packet.rs).
def vsock_header(op, length=0, src_cid=3, dst_cid=2, kind=1, flags=0, buf_alloc=262144,
                 fwd_cnt=0, src_port=1234, dst_port=5000):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, kind, op,
                       flags, buf_alloc, fwd_cnt)


def vsock_seed(name, descs, memory, rx_len=0, rx_header=None, cid_sel=0):
    rx_header = rx_header or vsock_header(5, 0)
    data = bytes([len(descs), cid_sel]) + struct.pack("<HH", 0, rx_len) + rx_header
    data += b"".join(descs)
    mem = bytearray()
    for at, blob in memory:
        place(mem, at, blob)
    write("vsock_packet", name, data + bytes(mem))


VS_RW, VS_REQUEST, VS_SHUTDOWN = 5, 1, 4
vsock_seed("rw-split-header", [desc(0x100, 20, NEXT, 1), desc(0x200, 24, NEXT, 2),
                               desc(0x300, 5)],
           [(0x100, vsock_header(VS_RW, 5)[:20]), (0x200, vsock_header(VS_RW, 5)[20:]),
            (0x300, b"hello")])
vsock_seed("request-one-descriptor", [desc(0x100, 44)], [(0x100, vsock_header(VS_REQUEST))])
vsock_seed("len-beyond-buffers", [desc(0x100, 44, NEXT, 1), desc(0x200, 3)],
           [(0x100, vsock_header(VS_RW, 1000)), (0x200, b"abc")])
vsock_seed("shutdown-wrong-cid", [desc(0x100, 44)],
           [(0x100, vsock_header(VS_SHUTDOWN, 0, src_cid=7, flags=3))])
vsock_seed("rx-linux-6.1", [desc(0x1000, 44, NEXT | WRITE, 1), desc(0x2000, 4096, WRITE)],
           [], rx_len=4096, rx_header=vsock_header(VS_RW, 4096, src_cid=2, dst_cid=3))
vsock_seed("rx-across-regions", [desc(0x3ff0, 0x20, NEXT | WRITE, 1),
                                 desc(0x9000, 0x100, WRITE)], [], rx_len=200)
vsock_seed("rx-large-region", [desc(1 << 32, 0x12000, WRITE, big=True)], [], rx_len=0xffff)


# virtio_balloon: flags (EVENT_IDX, STATS_VQ, DEFLATE_ON_OOM, queue size), start index, target,
# operations, then memory from 0x1000 (fuzz/fuzz_targets/virtio_balloon.rs).
B_INFLATE, B_DEFLATE, B_STATS, B_HOST, B_ASK_STATS = 0, 1, 2, 3, 3 | 4


def b_frame(pfn):
    """A frame number's one-byte encoding: below 0x14 as is, or the largest ones."""
    if pfn < 0x14:
        return pfn
    assert pfn >= 0xFFFF_FFE0
    return 0xE0 | (0xFFFF_FFFF - pfn)


def b_chain(queue, descs, frames=None, indirect=False, head=0, used_event=0):
    mode = (len(descs) - 1) | (8 if indirect else 0) | (0x10 if frames is not None else 0)
    out = bytes([queue, mode, head, used_event]) + b"".join(descs)
    if frames is not None:
        out += bytes([len(frames)]) + bytes(b_frame(p) for p in frames)
    return out


def balloon_seed(name, ops, memory=(), flags=0b100_011, start=0, target=4):
    data = bytes([flags]) + struct.pack("<H", start) + bytes([target, len(ops)]) + b"".join(ops)
    mem = bytearray()
    for at, blob in memory:
        place(mem, at - 0x1000, blob)
    write("virtio_balloon", name, data + bytes(mem))


def stat(tag, value):
    return struct.pack("<HQ", tag, value)


STATS_BUF = stat(4, 100 << 20) + stat(5, 1 << 30) + stat(77, 1) + stat(4, 99 << 20) + b"\x06\x00"
# Linux: ten PFNs in one buffer (a run across the region boundary at frame 4, the hole, past
# RAM, a duplicate), deflate them, statistics, a host request for fresh ones, a new target.
balloon_seed("linux-like", [
    b_chain(B_STATS, [desc(0x1800, len(STATS_BUF))]),
    b_chain(B_INFLATE, [desc(0x2000, 40)], [2, 3, 4, 5, 8, 0x11, 0xFFFF_FFFF, 3, 9, 0x10]),
    b_chain(B_DEFLATE, [desc(0x2100, 16)], [2, 3, 8, 0x12]),
    bytes([B_ASK_STATS]),
    b_chain(B_STATS, [desc(0x1800, len(STATS_BUF))], head=1),
    bytes([B_HOST, 9]),
], [(0x1800, STATS_BUF)])
# A frame list split across an indirect table, a length not a multiple of 4, a device-writable
# buffer, one in the hole, one that runs off the end of RAM.
balloon_seed("hostile-buffers", [
    b_chain(B_INFLATE, [desc(0x2000, 6), desc(0x3ffe, 6), desc(0x9000, 3)], [10, 11, 12, 13],
            indirect=True),
    b_chain(B_INFLATE, [desc(0x2200, 8, WRITE)], [14, 15]),
    b_chain(B_INFLATE, [desc(0x8800, 8)]),
    b_chain(B_DEFLATE, [desc(0x10ffc, 8)]),
    b_chain(B_STATS, [desc(0x9100, 10, WRITE)]),
    b_chain(B_STATS, [desc(0x3ff8, 20)], head=1),
], flags=0b011_010, start=0xFFFE)
