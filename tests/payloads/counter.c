/* Snapshot test guest: counts and prints, touching memory as it goes, so that an interrupted-and-restored
 * run must reproduce exactly the output of an uninterrupted one.
 * Each step n (0..COUNT-1) writes a pattern into page n of a 1 MiB buffer, folds the buffer's state into a
 * running FNV-1a sum, prints "COUNT n sum=...", then waits ~DELAY TSC cycles. The last line is
 * "DONE sum=..." and the exit status is 0 (debug-exit status 1). Command line: count=N (default 40). */
#include "guest.h"

#define PAGES 256
static volatile uint8_t buf[PAGES][4096] __attribute__((aligned(4096)));

static unsigned arg(const char *cmdline, const char *key, unsigned dflt) {
    size_t n = 0;
    while (key[n]) n++;
    for (const char *p = cmdline; *p; p++) {
        size_t i = 0;
        while (i < n && p[i] == key[i]) i++;
        if (i == n && p[n] == '=') {
            unsigned v = 0;
            for (p += n + 1; *p >= '0' && *p <= '9'; p++) v = v * 10 + (unsigned)(*p - '0');
            return v;
        }
    }
    return dflt;
}

int main(const struct bh_bootinfo *bi) {
    unsigned count = arg(bi->cmdline, "count", 40);
    unsigned delay = arg(bi->cmdline, "delay", 2000000);
    uint64_t sum = 1469598103934665603ull;
    for (unsigned n = 0; n < count; n++) {
        volatile uint8_t *page = buf[n % PAGES];
        for (unsigned i = 0; i < 64; i++)
            page[i * 64] = (uint8_t)(n * 31 + i);
        for (unsigned i = 0; i < 64; i++) {
            sum ^= page[i * 64];
            sum *= 1099511628211ull;
        }
        printf("COUNT %u sum=%lx\n", n, sum);
        uint64_t t = rdtsc();
        while (rdtsc() - t < delay)
            __asm__ volatile("pause");
    }
    printf("DONE sum=%lx\n", sum);
    return 0;
}
