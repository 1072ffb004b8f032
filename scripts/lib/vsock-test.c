/*
 * vsock-test: an AF_VSOCK stream peer for Ferrovisor's virtio-vsock tests, built statically
 * into the test root file system (/usr/bin/vsock-test) by scripts/fetch-guest-fixtures.sh.
 *
 *   vsock-test listen PORT
 *       Accepts one connection on PORT and echoes every byte back inverted (b ^ 0xff) until
 *       the peer shuts down its sending side, then shuts down its own. Prints
 *       "VSOCK-LISTENING=PORT" once it listens and, at the end,
 *       "VSOCK-ECHOED=<bytes> <fnv1a-32 of the bytes received, 8 hex digits>".
 *   vsock-test connect CID PORT BYTES
 *       Connects to CID:PORT, sends BYTES bytes of the pattern byte[i] = i % 251, shuts down
 *       its sending side and reads the reply to end of file. Prints
 *       "VSOCK-SENT=<bytes>" and "VSOCK-REPLY=<the reply, non-printable bytes as '.'>"
 *       (at most 200 bytes of it), or "VSOCK-ERROR=<what>: <strerror>" on failure.
 *
 * Exit status 0 on success, 1 on an error, 2 on bad arguments.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define CHUNK 65536
#define REPLY_MAX 200

static unsigned char buf[CHUNK];

static int fail(const char *what)
{
    printf("VSOCK-ERROR=%s: %s\n", what, strerror(errno));
    fflush(stdout);
    return 1;
}

static int parse_u32(const char *s, uint32_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || v > UINT32_MAX)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int do_listen(uint32_t port)
{
    struct sockaddr_vm addr;
    uint64_t total = 0;
    uint32_t hash = 0x811c9dc5u;
    int s, c;

    s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = port;
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        return fail("bind");
    if (listen(s, 1) < 0)
        return fail("listen");
    printf("VSOCK-LISTENING=%u\n", port);
    fflush(stdout);
    do {
        c = accept(s, NULL, NULL);
    } while (c < 0 && errno == EINTR);
    if (c < 0)
        return fail("accept");
    close(s);
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail("read");
        }
        if (n == 0)
            break;
        for (ssize_t i = 0; i < n; i++) {
            hash = (hash ^ buf[i]) * 0x01000193u;
            buf[i] ^= 0xff;
        }
        if (write_all(c, buf, (size_t)n) < 0)
            return fail("write");
        total += (uint64_t)n;
    }
    if (shutdown(c, SHUT_WR) < 0)
        return fail("shutdown");
    close(c);
    printf("VSOCK-ECHOED=%llu %08x\n", (unsigned long long)total, hash);
    fflush(stdout);
    return 0;
}

static int do_connect(uint32_t cid, uint32_t port, uint32_t bytes)
{
    struct sockaddr_vm addr;
    char reply[REPLY_MAX + 1];
    size_t got = 0;
    uint32_t sent = 0;
    int s;

    s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = cid;
    addr.svm_port = port;
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        return fail("connect");
    while (sent < bytes) {
        size_t n = bytes - sent < CHUNK ? bytes - sent : CHUNK;
        for (size_t i = 0; i < n; i++)
            buf[i] = (unsigned char)((sent + i) % 251);
        if (write_all(s, buf, n) < 0)
            return fail("write");
        sent += (uint32_t)n;
    }
    if (shutdown(s, SHUT_WR) < 0)
        return fail("shutdown");
    printf("VSOCK-SENT=%u\n", sent);
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail("read");
        }
        if (n == 0)
            break;
        for (ssize_t i = 0; i < n && got < REPLY_MAX; i++) {
            unsigned char b = buf[i];
            reply[got++] = (b >= 0x20 && b < 0x7f) ? (char)b : '.';
        }
    }
    reply[got] = '\0';
    close(s);
    printf("VSOCK-REPLY=%s\n", reply);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    uint32_t cid, port, bytes;

    if (argc == 3 && strcmp(argv[1], "listen") == 0 && parse_u32(argv[2], &port) == 0)
        return do_listen(port);
    if (argc == 5 && strcmp(argv[1], "connect") == 0 && parse_u32(argv[2], &cid) == 0 &&
        parse_u32(argv[3], &port) == 0 && parse_u32(argv[4], &bytes) == 0)
        return do_connect(cid, port, bytes);
    fprintf(stderr, "usage: vsock-test listen PORT | vsock-test connect CID PORT BYTES\n");
    return 2;
}
