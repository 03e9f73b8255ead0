/* Red team, cross-VM probe, VM A: fill guest RAM with a secret.
 *
 * Command line: `secret=<64-bit number>` (required), `mib=<n>` (default 16): fill n MiB starting at
 * 16 MiB with the 8-byte little-endian secret (rep stosq), `exit=1`: exit (code 0) after DONE
 * instead of spinning. Output: `DONE secret=0x<secret> base=0x<addr> bytes=<n>`, then spins with
 * interrupts off (the host stops it) or exits.
 */
#include "guest.h"

int bh_want_mptable = 0;

#define FILL_BASE 0x1000000UL

int main(const struct bh_bootinfo *bi) {
    char buf[32];
    uint64_t secret = 0, mib = 16, ex = 0;
    if (!bh_cmdline_get(bi->cmdline, "secret", buf, sizeof(buf)) || !bh_parse_u64(buf, &secret)) {
        printf("FAIL no secret= on the command line\n");
        return 1;
    }
    if (bh_cmdline_get(bi->cmdline, "mib", buf, sizeof(buf)))
        bh_parse_u64(buf, &mib);
    if (bh_cmdline_get(bi->cmdline, "exit", buf, sizeof(buf)))
        bh_parse_u64(buf, &ex);
    uint64_t count = (mib << 20) / 8;
    void *dst = (void *)FILL_BASE;
    __asm__ volatile("rep stosq" : "+D"(dst), "+c"(count) : "a"(secret) : "memory");
    printf("DONE secret=0x%lx base=0x%lx bytes=%lu\n", secret, FILL_BASE, mib << 20);
    if (ex)
        return 0;
    for (;;)
        __asm__ volatile("cli; hlt");
}
