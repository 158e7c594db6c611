/*
 * Preloaded into the `srun` that carries the relay (LD_PRELOAD, set by hpc_kernels.relay).
 *
 * Slurm 22.05 forwards a step's stdio over TCP between srun and slurmstepd in chunks of at most
 * 1 KiB, each its own send, without TCP_NODELAY. Back-to-back small sends then wait for the
 * peer's delayed ACK (40 ms on Linux): a Jupyter round trip, which is several small messages
 * each way, took 45-90 ms instead of well under 1 ms.
 *
 * On every TCP socket srun opens or accepts this sets TCP_NODELAY (srun's own sends leave at
 * once), and after every read it re-arms TCP_QUICKACK (srun acknowledges slurmstepd's sends at
 * once, so slurmstepd's Nagle algorithm never waits). Nothing else changes; errors are ignored,
 * so on a non-TCP descriptor each call is a harmless failed setsockopt.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

static void set_opt(int fd, int opt)
{
	int one = 1;
	int saved = errno;

	setsockopt(fd, IPPROTO_TCP, opt, &one, sizeof(one));
	errno = saved;
}

static int is_tcp(int fd)
{
	int type = 0;
	socklen_t len = sizeof(type);
	struct sockaddr_storage addr;
	socklen_t alen = sizeof(addr);

	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
		return 0;
	if (getsockname(fd, (struct sockaddr *)&addr, &alen) != 0)
		return 0;
	return addr.ss_family == AF_INET || addr.ss_family == AF_INET6;
}

static void tune(int fd)
{
	int saved = errno;

	if (fd >= 0 && is_tcp(fd)) {
		set_opt(fd, TCP_NODELAY);
		set_opt(fd, TCP_QUICKACK);
	}
	errno = saved;
}

#define REAL(name) static __typeof__(name) *real_##name; \
	if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	REAL(connect);
	int rc = real_connect(fd, addr, len);
	tune(fd);
	return rc;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	REAL(accept);
	int rc = real_accept(fd, addr, len);
	tune(rc);
	return rc;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	REAL(accept4);
	int rc = real_accept4(fd, addr, len, flags);
	tune(rc);
	return rc;
}

/* TCP_QUICKACK is not sticky: the kernel may leave quick-ack mode, so re-arm it after reads. */
ssize_t read(int fd, void *buf, size_t count)
{
	REAL(read);
	ssize_t rc = real_read(fd, buf, count);
	if (rc > 0)
		set_opt(fd, TCP_QUICKACK);
	return rc;
}

ssize_t recv(int fd, void *buf, size_t count, int flags)
{
	REAL(recv);
	ssize_t rc = real_recv(fd, buf, count, flags);
	if (rc > 0)
		set_opt(fd, TCP_QUICKACK);
	return rc;
}
