// SPDX-License-Identifier: GPL-2.0
/*
 * xmm-bench: cost per 4 KiB page of moving a program's pages out of it from
 * another process (UFFDIO_MOVE_MODE_CROSS_MM_OUT) compared with copying
 * them out (process_vm_readv), and with UFFDIO_MOVE inside one mm.
 * Build: gcc -O2 -static -isystem <patched kernel>/usr/include xmm-bench.c
 * Prints one line per case: median us/page over REPS runs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PS	4096UL
#define NPAGES	16384UL		/* 64 MiB */
#define LEN	(NPAGES * PS)
#define REPS	5

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static int new_uffd(uint64_t features)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	int fd = syscall(__NR_userfaultfd, O_CLOEXEC);

	if (fd < 0 || ioctl(fd, UFFDIO_API, &api)) {
		perror("userfaultfd");
		exit(1);
	}
	return fd;
}

static void reg(int fd, void *p, size_t len)
{
	struct uffdio_register r = {
		.range = { .start = (unsigned long)p, .len = len },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};

	if (ioctl(fd, UFFDIO_REGISTER, &r)) {
		perror("register");
		exit(1);
	}
}

static void *map(void)
{
	void *p = mmap(NULL, LEN, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		exit(1);
	madvise(p, LEN, MADV_NOHUGEPAGE);
	return p;
}

static void move(int fd, char *dst, char *src, size_t len, uint64_t mode)
{
	struct uffdio_move m = {
		.dst = (unsigned long)dst, .src = (unsigned long)src,
		.len = len, .mode = mode,
	};

	if (ioctl(fd, UFFDIO_MOVE, &m)) {
		fprintf(stderr, "UFFDIO_MOVE: %s (moved %lld)\n",
			strerror(errno), (long long)m.move);
		exit(1);
	}
}

/* move LEN between a and b in batches of @batch pages, return us/page */
static double run(int fd, char *dst, char *src, size_t batch, uint64_t mode)
{
	double t = now();
	size_t off;

	for (off = 0; off < LEN; off += batch * PS)
		move(fd, dst + off, src + off, batch * PS, mode);
	return (now() - t) * 1e6 / NPAGES;
}

static void report(const char *name, double *v)
{
	qsort(v, REPS, sizeof(*v), cmp);
	printf("%-48s %7.3f us/page (min %.3f max %.3f)\n", name, v[REPS / 2],
	       v[0], v[REPS - 1]);
}

int main(void)
{
	uint64_t xf = UFFD_FEATURE_MOVE | UFFD_FEATURE_MOVE_CROSS_MM;
	size_t batches[] = { 1, 64, NPAGES };
	char cbuf[CMSG_SPACE(sizeof(int))] = {};
	char *area, *buf, *a, *b, name[64];
	struct msghdr msg = { 0 };
	struct cmsghdr *cmsg;
	struct iovec iov;
	double v[REPS];
	const char *copy = "process_vm_readv (copy only)";
	int sv[2], fd, memfd, i, j;
	pid_t pid;

	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	pid = fork();
	if (!pid) {
		area = map();
		memset(area, 0x5a, LEN);
		fd = new_uffd(xf);
		reg(fd, area, LEN);
		iov.iov_base = &area;
		iov.iov_len = sizeof(area);
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = cbuf;
		msg.msg_controllen = sizeof(cbuf);
		cmsg = CMSG_FIRSTHDR(&msg);
		cmsg->cmsg_level = SOL_SOCKET;
		cmsg->cmsg_type = SCM_RIGHTS;
		cmsg->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
		sendmsg(sv[1], &msg, 0);
		pause();
		_exit(0);
	}
	iov.iov_base = &area;
	iov.iov_len = sizeof(area);
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = cbuf;
	msg.msg_controllen = sizeof(cbuf);
	if (recvmsg(sv[0], &msg, 0) != sizeof(area))
		return 1;
	memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof(int));
	buf = map();

	for (j = 0; j < 3; j++) {
		for (i = 0; i < REPS; i++) {
			v[i] = run(fd, buf, area, batches[j],
				   UFFDIO_MOVE_MODE_CROSS_MM_OUT);
			/* put them back, untimed */
			run(fd, area, buf, NPAGES, UFFDIO_MOVE_MODE_CROSS_MM_IN);
		}
		snprintf(name, sizeof(name), "cross-mm OUT, %zu pages/ioctl",
			 batches[j]);
		report(name, v);
	}
	for (i = 0; i < REPS; i++) {
		run(fd, buf, area, NPAGES, UFFDIO_MOVE_MODE_CROSS_MM_OUT);
		v[i] = run(fd, area, buf, 64, UFFDIO_MOVE_MODE_CROSS_MM_IN);
	}
	report("cross-mm IN, 64 pages/ioctl", v);

	/* copying out instead: process_vm_readv, or /proc/PID/mem */
	snprintf(name, sizeof(name), "/proc/%d/mem", pid);
	memfd = open(name, O_RDONLY);
	for (i = 0; i < REPS; i++) {
		struct iovec l = { buf, LEN }, r = { area, LEN };
		double t = now();

		if (process_vm_readv(pid, &l, 1, &r, 1, 0) != (ssize_t)LEN) {
			if (errno != ENOSYS ||
			    pread(memfd, buf, LEN, (off_t)area) != (ssize_t)LEN) {
				perror("copy");
				return 1;
			}
			copy = "pread(/proc/PID/mem) (copy only)";
		}
		v[i] = (now() - t) * 1e6 / NPAGES;
		madvise(buf, LEN, MADV_DONTNEED);
	}
	report(copy, v);

	/* same-mm reference: move inside this process */
	fd = new_uffd(UFFD_FEATURE_MOVE);
	a = map();
	b = map();
	memset(a, 0x5a, LEN);
	reg(fd, a, LEN);
	reg(fd, b, LEN);
	for (j = 0; j < 3; j++) {
		for (i = 0; i < REPS; i++) {
			v[i] = run(fd, b, a, batches[j], 0);
			run(fd, a, b, NPAGES, 0);
		}
		snprintf(name, sizeof(name), "same-mm UFFDIO_MOVE, %zu pages/ioctl",
			 batches[j]);
		report(name, v);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return 0;
}
