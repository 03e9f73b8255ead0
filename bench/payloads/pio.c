/* Port-I/O exit benchmark: `count` (default 200000) `outb` instructions to `port` (default 0x80, the
 * write-only POST/diagnostic port). Command line: port=0xNN count=N. Prints PIO_START before and
 * PIO_DONE after the loop, then exits with debug-exit code 0. */
#include "guest.h"

int bh_want_mptable = 0; /* keep ring-0 start-up work minimal */

int main(const struct bh_bootinfo *bi) {
    char buf[32];
    uint64_t port = 0x80, count = 200000;
    if (bh_cmdline_get(bi->cmdline, "port", buf, sizeof buf) && (!bh_parse_u64(buf, &port) || port > 0xffff)) {
        printf("FAIL bad port=\n");
        return 1;
    }
    if (bh_cmdline_get(bi->cmdline, "count", buf, sizeof buf) && (!bh_parse_u64(buf, &count) || count > 0xffffffffUL)) {
        printf("FAIL bad count=\n");
        return 1;
    }
    printf("PIO_START port=0x%lx count=%lu\n", port, count);
    uint64_t t0 = rdtsc();
    if (count) {
        uint32_t n = (uint32_t)count;
        __asm__ volatile("1: outb %%al, %%dx\n\tdecl %%ecx\n\tjnz 1b"
                         : "+c"(n)
                         : "a"(0), "d"((uint16_t)port)
                         : "memory");
    }
    uint64_t t1 = rdtsc();
    printf("PIO_DONE count=%lu tsc=%lu\n", count, t1 - t0);
    return 0;
}
