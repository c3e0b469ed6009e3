/*
 * vmarchive test-guest workload: makes any desynchronisation between a guest's
 * RAM and its disk visible from inside the guest, and gives memory-export tests
 * pages with known content at known guest-physical frames.
 *
 * Runs as PID 1's child in a busybox initramfs (see guest/init). Everything it
 * prints goes to the serial console (ttyS0); tests/guestlib.py parses it. The
 * byte layouts below are mirrored there; change both together.
 *
 * Lines (one each, in this order at start):
 *   CONFIG tick_ms=T churn=C fill=F writer=SEED|off writer_blocks=B
 *   COUNTER pfn=0xP               frame of the counter page
 *   PATTERN i pfn=0xP             i = 0..63, frames of the pattern pages
 *   GUEST UP boot=ID              ID = 16 hex digits, random per boot
 * then every tick_ms:
 *   tick N boot=ID [wseq=K]       printed after the disk holds N (K = writer blocks so far)
 *   MISMATCH ram=X disk=Y boot=ID disk_boot=ID2   (before the write of tick N, when the disk
 *                                 block does not hold what RAM says was written last)
 *
 * Kernel command line (all optional): vma.tick_ms=200 vma.churn=MiB/s vma.fill=MiB
 *   vma.writer=SEED (random writer to /dev/vdb) vma.writer_blocks=16 (4 KiB blocks per tick)
 *
 * Counter page (4096 bytes, page-aligned, mlock'ed; little-endian):
 *   0  char[24] "VMARCHIVE-COUNTER" NUL-padded
 *   24 u64 boot id   32 u64 counter (last completed tick)   40 u64 last value written to disk
 *   48 u64 in_check: the tick N whose check and write are under way, 0 outside them.  An
 *      instant taken while it is non-zero may fall after the check's read and before the
 *      write: a guest resumed from there overwrites the tick block unread, so a disk that
 *      disagrees with its RAM goes unreported (the check's blind window).
 * Tick block: 4096 bytes at byte offset 1 MiB of /dev/vda, O_DIRECT both ways:
 *   0  char[16] "VMARCHIVE-TICK" NUL-padded   16 u64 boot id   24 u64 counter   32 u64 ~counter
 *   rest zero
 * Pattern page i (64 pages, mlock'ed, content identical on every boot):
 *   0  char[24] "VMARCHIVE-PATTERN" NUL-padded   24 u64 i
 *   32..4095: 508 u64 = successive splitmix64 outputs from state PATTERN_SEED + i
 * Writer block number k (k = 0, 1, ... per boot) on /dev/vdb (nblocks = size / 4096):
 *   position: block index = splitmix64(&pos_state) % nblocks, pos_state starts at SEED and
 *             advances once per block
 *   content:  0 char[16] "VMARCHIVE-WRITER"  16 u64 SEED  24 u64 k
 *             32..4095: splitmix64 outputs from state SEED ^ (0xD1B54A32D192ED03 * (k + 1))
 *
 * The magic strings are assembled at run time so that the only copies in guest RAM are the
 * live pages (the binary itself sits in the initramfs, which is RAM too).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define TICK_OFFSET (1024 * 1024)
#define NPATTERN 64
#define PATTERN_SEED 0x564D415243484956ULL /* "VMARCHIV" */
#define WRITER_MIX 0xD1B54A32D192ED03ULL
#define CHURN_DEFAULT_MIB 16

struct counter_page {
	char magic[24];
	uint64_t boot_id;
	uint64_t counter;
	uint64_t last_written;
	uint64_t in_check;
};

/* Keeps the compiler from moving the counter page's stores across it: an instant is taken
 * between two instructions, so the page must hold what the program order says. */
#define ORDERED() __asm__ volatile("" ::: "memory")

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static void say(const char *fmt, ...)
{
	char line[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	/* One write per line: lines never interleave. */
	while (write(1, line, n) < 0 && errno == EINTR)
		;
}

/* "VMARCHIVE-" + suffix, NUL-padded to len bytes. */
static void magic(char *dst, size_t len, const char *suffix)
{
	char buf[32] = {0};
	static const char a[] = {'V', 'M', 'A', 'R', 'C', 'H', 'I', 'V', 'E', '-'};
	memcpy(buf, a, sizeof a);
	strncpy(buf + sizeof a, suffix, sizeof buf - sizeof a - 1);
	memset(dst, 0, len);
	memcpy(dst, buf, strlen(buf) < len ? strlen(buf) : len);
}

static uint64_t param(const char *cmdline, const char *name, uint64_t dflt, int *present)
{
	char key[64];
	snprintf(key, sizeof key, "vma.%s=", name);
	for (const char *p = cmdline; (p = strstr(p, key)) != NULL; p++) {
		if (p != cmdline && p[-1] != ' ')
			continue;
		if (present)
			*present = 1;
		return strtoull(p + strlen(key), NULL, 0);
	}
	if (present)
		*present = 0;
	return dflt;
}

static uint64_t pfn_of(void *addr)
{
	int fd = open("/proc/self/pagemap", O_RDONLY);
	uint64_t entry = 0;
	if (fd < 0)
		return 0;
	off_t off = (off_t)((uintptr_t)addr / PAGE) * 8;
	if (pread(fd, &entry, 8, off) != 8)
		entry = 0;
	close(fd);
	if (!(entry >> 63))
		return 0; /* not present */
	return entry & ((1ULL << 55) - 1);
}

static void *pages(size_t n, int lock)
{
	void *p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		say("FATAL mmap %zu pages: %s", n, strerror(errno));
		exit(1);
	}
	madvise(p, n * PAGE, MADV_NOHUGEPAGE); /* 4 KiB frames that khugepaged never moves */
	memset(p, 0, n * PAGE);
	if (lock && mlock(p, n * PAGE) != 0)
		say("WARNING mlock: %s", strerror(errno));
	return p;
}

static void fill_random(uint64_t *w, size_t nwords, uint64_t *state)
{
	for (size_t i = 0; i < nwords; i++)
		w[i] = splitmix64(state);
}

static void sleep_until(struct timespec *next, long tick_ms)
{
	struct timespec now;
	next->tv_nsec += tick_ms * 1000000L;
	while (next->tv_nsec >= 1000000000L) {
		next->tv_nsec -= 1000000000L;
		next->tv_sec++;
	}
	clock_gettime(CLOCK_MONOTONIC, &now);
	/* After a long stop (pause, save/restore) do not race to catch up: restart the schedule. */
	if (now.tv_sec > next->tv_sec + 1) {
		*next = now;
		return;
	}
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, next, NULL) == EINTR)
		;
}

int main(void)
{
	char cmdline[4096] = {0};
	int fd = open("/proc/cmdline", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
		cmdline[n > 0 ? n : 0] = 0;
		close(fd);
	}
	long tick_ms = (long)param(cmdline, "tick_ms", 200, NULL);
	uint64_t churn_mib = param(cmdline, "churn", 0, NULL);
	uint64_t fill_mib = param(cmdline, "fill", 0, NULL);
	int writer_on = 0;
	uint64_t writer_seed = param(cmdline, "writer", 0, &writer_on);
	uint64_t writer_blocks = param(cmdline, "writer_blocks", 16, NULL);
	if (tick_ms <= 0)
		tick_ms = 200;

	uint64_t boot_id = 0;
	while (boot_id == 0)
		if (getrandom(&boot_id, sizeof boot_id, 0) != sizeof boot_id)
			boot_id = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();

	say("CONFIG tick_ms=%ld churn=%llu fill=%llu writer=%s%llu writer_blocks=%llu", tick_ms,
	    (unsigned long long)churn_mib, (unsigned long long)fill_mib, writer_on ? "" : "off/",
	    (unsigned long long)writer_seed, (unsigned long long)writer_blocks);

	struct counter_page *cp = pages(1, 1);
	magic(cp->magic, sizeof cp->magic, "COUNTER");
	cp->boot_id = boot_id;
	say("COUNTER pfn=0x%llx", (unsigned long long)pfn_of(cp));

	uint8_t *pat = pages(NPATTERN, 1);
	for (int i = 0; i < NPATTERN; i++) {
		uint8_t *pg = pat + (size_t)i * PAGE;
		uint64_t st = PATTERN_SEED + (uint64_t)i, idx = (uint64_t)i;
		magic((char *)pg, 24, "PATTERN");
		memcpy(pg + 24, &idx, 8);
		fill_random((uint64_t *)(pg + 32), (PAGE - 32) / 8, &st);
	}
	for (int i = 0; i < NPATTERN; i++)
		say("PATTERN %d pfn=0x%llx", i, (unsigned long long)pfn_of(pat + (size_t)i * PAGE));

	/* RAM fill: random content, different every boot (seeded by the boot id). */
	uint64_t rng = boot_id;
	size_t churn_pages = 0;
	uint8_t *churn_area = NULL;
	if (fill_mib) {
		churn_pages = fill_mib * 256;
		churn_area = pages(churn_pages, 0);
		fill_random((uint64_t *)churn_area, churn_pages * PAGE / 8, &rng);
	}
	if (churn_mib && !churn_area) {
		churn_pages = CHURN_DEFAULT_MIB * 256;
		churn_area = pages(churn_pages, 0);
	}
	size_t churn_per_tick = churn_mib ? (size_t)(churn_mib * 256 * tick_ms / 1000) : 0;
	if (churn_mib && churn_per_tick == 0)
		churn_per_tick = 1;
	size_t churn_cursor = 0;

	int vda = open("/dev/vda", O_RDWR | O_DIRECT);
	if (vda < 0)
		say("FATAL open /dev/vda: %s", strerror(errno));
	uint8_t *blk = aligned_alloc(PAGE, PAGE);

	int vdb = -1;
	uint64_t wblocks = 0, wpos = writer_seed, wseq = 0;
	uint8_t *wbuf = aligned_alloc(PAGE, PAGE);
	if (writer_on) {
		uint64_t size = 0;
		vdb = open("/dev/vdb", O_RDWR | O_DIRECT);
		if (vdb < 0 || ioctl(vdb, BLKGETSIZE64, &size) != 0 || size < PAGE) {
			say("FATAL writer needs /dev/vdb: %s", strerror(errno));
			vdb = -1;
		} else {
			wblocks = size / PAGE;
		}
	}

	say("GUEST UP boot=%016llx", (unsigned long long)boot_id);

	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (;;) {
		uint64_t n = cp->counter + 1;
		if (vda >= 0) {
			cp->in_check = n;
			ORDERED();
			if (cp->last_written != 0) {
				if (pread(vda, blk, PAGE, TICK_OFFSET) != PAGE) {
					say("IOERROR read /dev/vda: %s", strerror(errno));
				} else {
					char want[16];
					uint64_t dboot, dval;
					magic(want, sizeof want, "TICK");
					memcpy(&dboot, blk + 16, 8);
					memcpy(&dval, blk + 24, 8);
					int ok = memcmp(blk, want, sizeof want) == 0;
					if (!ok || dboot != cp->boot_id || dval != cp->last_written)
						say("MISMATCH ram=%llu disk=%llu boot=%016llx disk_boot=%016llx",
						    (unsigned long long)cp->last_written,
						    (unsigned long long)(ok ? dval : 0),
						    (unsigned long long)cp->boot_id,
						    (unsigned long long)(ok ? dboot : 0));
				}
			}
			uint64_t inv = ~n;
			memset(blk, 0, PAGE);
			magic((char *)blk, 16, "TICK");
			memcpy(blk + 16, &cp->boot_id, 8);
			memcpy(blk + 24, &n, 8);
			memcpy(blk + 32, &inv, 8);
			if (pwrite(vda, blk, PAGE, TICK_OFFSET) != PAGE)
				say("IOERROR write /dev/vda: %s", strerror(errno));
			else
				cp->last_written = n;
			ORDERED();
			cp->in_check = 0;
		}
		cp->counter = n;

		if (vdb >= 0) {
			for (uint64_t i = 0; i < writer_blocks; i++, wseq++) {
				uint64_t b = splitmix64(&wpos) % wblocks;
				uint64_t st = writer_seed ^ (WRITER_MIX * (wseq + 1));
				magic((char *)wbuf, 16, "WRITER");
				memcpy(wbuf + 16, &writer_seed, 8);
				memcpy(wbuf + 24, &wseq, 8);
				fill_random((uint64_t *)(wbuf + 32), (PAGE - 32) / 8, &st);
				if (pwrite(vdb, wbuf, PAGE, (off_t)(b * PAGE)) != PAGE)
					say("IOERROR write /dev/vdb: %s", strerror(errno));
			}
		}

		for (size_t i = 0; i < churn_per_tick; i++) {
			uint8_t *pg = churn_area + (churn_cursor++ % churn_pages) * PAGE;
			fill_random((uint64_t *)pg, PAGE / 8, &rng);
		}

		if (vdb >= 0)
			say("tick %llu boot=%016llx wseq=%llu", (unsigned long long)n,
			    (unsigned long long)boot_id, (unsigned long long)wseq);
		else
			say("tick %llu boot=%016llx", (unsigned long long)n, (unsigned long long)boot_id);
		sleep_until(&next, tick_ms);
	}
}
