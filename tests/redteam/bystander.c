/* Red team: an innocent VM running next to an attacked one. Prints `ALIVE <i>` every ~100 ms for
 * `ms=<n>` milliseconds (default 3000), checking a 1 MiB pattern it wrote at start is intact each time,
 * then PASS (exit code 0). `FAIL pattern` if its own memory changed. */
#include "guest.h"

int bh_want_mptable = 0;

#define AREA 0x2000000UL
#define WORDS (1 << 17)

int main(const struct bh_bootinfo *bi) {
    char buf[24];
    uint64_t ms = 3000;
    if (bh_cmdline_get(bi->cmdline, "ms", buf, sizeof(buf)))
        bh_parse_u64(buf, &ms);
    volatile uint64_t *a = (volatile uint64_t *)AREA;
    for (uint64_t i = 0; i < WORDS; i += 512)
        a[i] = i * 0x9e3779b97f4a7c15UL;
    for (uint64_t t = 0; t * 100 < ms; t++) {
        for (uint64_t i = 0; i < WORDS; i += 512) {
            if (a[i] != i * 0x9e3779b97f4a7c15UL) {
                printf("FAIL pattern at 0x%lx\n", (uint64_t)&a[i]);
                return 1;
            }
        }
        printf("ALIVE %lu\n", t);
        bh_udelay(100000);
    }
    printf("PASS\n");
    return 0;
}
