/* Snapshot benchmark guest: writes one byte into each of the first touch=MiB of a static arena (so the
 * snapshot carries that much memory), prints READY, polls COM1 for one input byte, prints GOT and exits 0.
 * A cold start and a restore are both timed from the command's start to this exit, with the byte
 * already waiting on stdin. */
#include "guest.h"

/* .bss.noclear: the boot code (guests/lib/entry.S) would zero a plain .bss arena with `rep stosq` in ring 0,
 * which KVM's emulator runs here at a few MB/s: 112 MiB took ~14 s of every cold start, and the bench
 * reported that as start-up cost (RAM is zero at allocation anyway: a memfd). */
static volatile uint8_t arena[112u << 20] __attribute__((aligned(4096), section(".bss.noclear.arena")));

int main(const struct bh_bootinfo *bi) {
    char buf[16];
    uint64_t mib = 0;
    if (bh_cmdline_get(bi->cmdline, "touch", buf, sizeof buf))
        bh_parse_u64(buf, &mib);
    if (mib > sizeof arena >> 20)
        mib = sizeof arena >> 20;
    for (uint64_t off = 0; off < (mib << 20); off += 4096)
        arena[off] = (uint8_t)(off >> 12) | 1;
    printf("READY\n");
    while (!(inb(BH_COM1 + 5) & 1))
        cpu_relax();
    printf("GOT %c\n", inb(BH_COM1));
    return 0;
}
