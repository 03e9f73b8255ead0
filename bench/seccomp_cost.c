/* Per-syscall cost of the worker's seccomp filter (bench/bench_seccomp.py builds and runs this).
 * Usage: seccomp_cost [PROGRAM.bpf]: with a program (struct sock_filter[], as sandbox/bpf.py caches it),
 * load it with no_new_privs + seccomp(TSYNC|TSYNC_ESRCH) first. Prints the best of 5 rounds of 2 M calls
 * each of getppid, ioctl(TCGETS) (the ioctl rule chain, as KVM_RUN takes) and pread. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <termios.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
    long n = 2000000;
    if (argc > 1) {
        static struct sock_filter f[4096]; FILE *fp = fopen(argv[1], "rb"); size_t c = fread(f, 8, 4096, fp); fclose(fp);
        struct sock_fprog p = { (unsigned short)c, f };
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 1 | 16, &p)) { perror("seccomp"); return 1; }
    }
    int fd = open("/dev/null", O_RDONLY); char buf[64]; struct termios tio;
    double best[3] = {1e9, 1e9, 1e9};
    for (int r = 0; r < 5; r++) {
        double t = now(); for (long i = 0; i < n; i++) syscall(SYS_getppid); t = now() - t; if (t < best[0]) best[0] = t;
        t = now(); for (long i = 0; i < n; i++) ioctl(fd, TCGETS, &tio); t = now() - t; if (t < best[1]) best[1] = t;
        t = now(); for (long i = 0; i < n; i++) pread(fd, buf, 1, 0); t = now() - t; if (t < best[2]) best[2] = t;
    }
    printf("%s getppid %.0f ns  ioctl(TCGETS) %.0f ns  pread %.0f ns\n", argc > 1 ? "filtered" : "plain   ",
           best[0] / n * 1e9, best[1] / n * 1e9, best[2] / n * 1e9);
    return 0;
}
