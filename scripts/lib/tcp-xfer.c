/*
 * tcp-xfer: moves a stream over TCP with large reads and writes, for Ferrovisor's virtio-net
 * tests; built statically into the test root file system (/usr/bin/tcp-xfer) by
 * scripts/fetch-guest-fixtures.sh. Busybox's nc copies in small chunks, so with Nagle's
 * algorithm and delayed ACKs its throughput measures the TCP timers, not the network.
 *
 *   tcp-xfer send IPV4 PORT   connect, copy stdin to the socket, shut down the sending side,
 *                             read the socket to its end (so nothing is left unread and the
 *                             peer's close cannot turn into a reset), then exit
 *   tcp-xfer recv IPV4 PORT   connect, copy the socket to stdout until the peer closes
 *
 * Messages go to stderr: "TCP-XFER-ERROR=<what>: <strerror>". Exit status 0 on success,
 * 1 on an error, 2 on bad arguments.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static char buf[CHUNK];

static int fail(const char *what)
{
    fprintf(stderr, "TCP-XFER-ERROR=%s: %s\n", what, strerror(errno));
    return 1;
}

/* Writes all of buf[0..n) to fd. */
static int write_all(int fd, const char *p, size_t n)
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

/* Copies from `in` to `out` until end of file; -1 on an error. */
static int copy(int in, int out)
{
    for (;;) {
        ssize_t r = read(in, buf, sizeof buf);
        if (r == 0)
            return 0;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (out >= 0 && write_all(out, buf, (size_t)r) < 0)
            return -1;
    }
}

int main(int argc, char **argv)
{
    if (argc != 4 || (strcmp(argv[1], "send") != 0 && strcmp(argv[1], "recv") != 0)) {
        fprintf(stderr, "usage: tcp-xfer send|recv IPV4 PORT\n");
        return 2;
    }
    struct sockaddr_in addr = { .sin_family = AF_INET };
    char *end;
    long port = strtol(argv[3], &end, 10);
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1 || *end || port < 1 || port > 65535) {
        fprintf(stderr, "tcp-xfer: bad address %s:%s\n", argv[2], argv[3]);
        return 2;
    }
    addr.sin_port = htons((unsigned short)port);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        return fail("connect");
    if (strcmp(argv[1], "send") == 0) {
        if (copy(0, s) < 0)
            return fail("send");
        if (shutdown(s, SHUT_WR) < 0)
            return fail("shutdown");
        if (copy(s, -1) < 0)
            return fail("drain");
    } else if (copy(s, 1) < 0) {
        return fail("recv");
    }
    close(s);
    return 0;
}
