/*
 * blkbench: a minimal block-device benchmark for bench/blk.sh (runs in the guest and on the
 * host; built with `gcc -O2 -static`, so it needs nothing from the guest's busybox root).
 *
 *   blkbench MODE PATH [-b BYTES] [-s BYTES] [-t SECS] [-w SECS] [-S SEED] [-B]
 *
 * MODE
 *   seqread   read PATH from offset 0 in blocks of -b bytes (default 1 MiB)
 *   seqwrite  write PATH from offset 0 in blocks of -b bytes (default 1 MiB); the data is a
 *             non-zero pattern, so the image stays non-zero for later reads
 *   randread  read blocks of -b bytes (default 4 KiB) at random aligned offsets, one at a
 *             time (queue depth 1)
 * Options
 *   -s BYTES  stop after this much data (default: the size of PATH for the sequential
 *             modes, which wrap around at the end; no limit for randread). Suffixes K, M,
 *             G (powers of 1024).
 *   -t SECS   stop after this many seconds as well (default 10; 0 = no time limit)
 *   -w SECS   first run the same loop for SECS unmeasured (default 0): code paths warm in
 *             the guest, the emulator's block cache and QEMU's translation cache
 *   -S SEED   seed of the random offsets (default 1)
 *   -B        buffered: no O_DIRECT (the host page-cache baseline)
 *
 * Output: one line "BLKBENCH-BEGIN mode=..." just before the clock starts (after the warm-up),
 * then one line
 *   BLKBENCH mode=M bs=B direct=0|1 ops=N bytes=N secs=S MiBps=X iops=Y lat_us=Z
 * (lat_us is the mean time per request), or "BLKBENCH-ERROR ..." and exit status 1.
 * Times come from clock_gettime(CLOCK_MONOTONIC). No flush is issued: with a volatile write
 * cache (virtio-blk with VIRTIO_BLK_F_FLUSH) an O_DIRECT write completes when the device
 * has it, which for both VMMs measured means "in the host's page cache".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum mode { SEQREAD, SEQWRITE, RANDREAD };

static const char *mode_name[] = { "seqread", "seqwrite", "randread" };

static void fail(const char *what, const char *path)
{
	printf("BLKBENCH-ERROR %s %s: %s\n", what, path ? path : "", strerror(errno));
	fflush(stdout);
	exit(1);
}

static void usage(void)
{
	fprintf(stderr, "usage: blkbench seqread|seqwrite|randread PATH [-b BYTES] [-s BYTES] "
			"[-t SECS] [-w SECS] [-S SEED] [-B]\n");
	exit(2);
}

static uint64_t parse_size(const char *s)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 10);
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	}
	if (end == s || *end != '\0')
		usage();
	return v;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* xorshift64*: plenty for spreading offsets, and the same sequence on every system. */
static uint64_t rng_state;

static uint64_t rng(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1DULL;
}

/* One benchmark loop; sequential modes continue where the previous call stopped. */
struct job {
	enum mode mode;
	int fd;
	const char *path;
	void *buf;
	uint64_t bs, blocks, off;
};

static double run(struct job *j, uint64_t limit_bytes, double limit_secs, uint64_t *ops_out,
		  uint64_t *bytes_out)
{
	uint64_t ops = 0, bytes = 0;
	double t0 = now(), t = t0;
	while (bytes < limit_bytes) {
		uint64_t off = j->mode == RANDREAD ? (rng() % j->blocks) * j->bs : j->off;
		ssize_t n = j->mode == SEQWRITE ? pwrite(j->fd, j->buf, j->bs, (off_t)off)
						: pread(j->fd, j->buf, j->bs, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fail(j->mode == SEQWRITE ? "pwrite" : "pread", j->path);
		}
		if ((uint64_t)n != j->bs) {
			errno = EIO;
			fail("short transfer", j->path);
		}
		ops++;
		bytes += j->bs;
		if (j->mode != RANDREAD && (j->off += j->bs) >= j->blocks * j->bs)
			j->off = 0;
		/* Reading the clock costs a vDSO call natively, a few hundred instructions in the
		 * emulated guest: negligible next to a request. */
		t = now();
		if (limit_secs > 0 && t - t0 >= limit_secs)
			break;
	}
	*ops_out = ops;
	*bytes_out = bytes;
	return t - t0;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		usage();
	enum mode mode;
	if (!strcmp(argv[1], "seqread"))
		mode = SEQREAD;
	else if (!strcmp(argv[1], "seqwrite"))
		mode = SEQWRITE;
	else if (!strcmp(argv[1], "randread"))
		mode = RANDREAD;
	else
		usage();
	const char *path = argv[2];
	uint64_t bs = mode == RANDREAD ? 4096 : 1 << 20;
	uint64_t limit_bytes = 0;
	double limit_secs = 10, warm_secs = 0;
	uint64_t seed = 1;
	int direct = 1;
	for (int i = 3; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-B")) {
			direct = 0;
			continue;
		}
		if (i + 1 >= argc)
			usage();
		const char *v = argv[++i];
		if (!strcmp(a, "-b"))
			bs = parse_size(v);
		else if (!strcmp(a, "-s"))
			limit_bytes = parse_size(v);
		else if (!strcmp(a, "-t"))
			limit_secs = strtod(v, NULL);
		else if (!strcmp(a, "-w"))
			warm_secs = strtod(v, NULL);
		else if (!strcmp(a, "-S"))
			seed = parse_size(v);
		else
			usage();
	}
	if (bs == 0 || bs % 512)
		usage();
	rng_state = seed ? seed : 1;

	int flags = (mode == SEQWRITE ? O_WRONLY : O_RDONLY) | (direct ? O_DIRECT : 0);
	int fd = open(path, flags);
	if (fd < 0)
		fail("open", path);

	uint64_t size;
	struct stat st;
	if (fstat(fd, &st) < 0)
		fail("fstat", path);
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(fd, BLKGETSIZE64, &size) < 0)
			fail("BLKGETSIZE64", path);
	} else {
		size = (uint64_t)st.st_size;
	}
	size -= size % bs;
	if (size == 0) {
		errno = EINVAL;
		fail("smaller than one block", path);
	}
	if (limit_bytes == 0)
		limit_bytes = mode == RANDREAD ? UINT64_MAX : size;
	if (limit_bytes == UINT64_MAX && limit_secs <= 0)
		usage(); /* randread without any limit would never end */

	void *buf;
	int err = posix_memalign(&buf, 4096, bs);
	if (err) {
		errno = err;
		fail("posix_memalign", NULL);
	}
	/* Non-zero and not constant: a write leaves recognisable, non-zero data. */
	for (uint64_t i = 0; i < bs / 8; i++)
		((uint64_t *)buf)[i] = 0x9e3779b97f4a7c15ULL * (i + 1);

	struct job j = { .mode = mode, .fd = fd, .path = path, .buf = buf, .bs = bs,
			 .blocks = size / bs };
	if (warm_secs > 0) {
		uint64_t ops, bytes;
		run(&j, UINT64_MAX, warm_secs, &ops, &bytes);
	}
	printf("BLKBENCH-BEGIN mode=%s path=%s bs=%llu size=%llu\n", mode_name[mode], path,
	       (unsigned long long)bs, (unsigned long long)size);
	fflush(stdout);
	uint64_t ops, bytes;
	double secs = run(&j, limit_bytes, limit_secs, &ops, &bytes);
	printf("BLKBENCH mode=%s bs=%llu direct=%d ops=%llu bytes=%llu secs=%.6f MiBps=%.2f "
	       "iops=%.1f lat_us=%.2f\n",
	       mode_name[mode], (unsigned long long)bs, direct, (unsigned long long)ops,
	       (unsigned long long)bytes, secs, secs > 0 ? (double)bytes / 1048576.0 / secs : 0.0,
	       secs > 0 ? (double)ops / secs : 0.0, ops ? secs * 1e6 / (double)ops : 0.0);
	fflush(stdout);
	close(fd);
	return 0;
}
