/* Red team: reads and writes of every width (1, 2, 4, 8) across the 32-bit MMIO hole
 * 0xc0000000..0xffffffff, sampled every 64 KiB at varying (also unaligned) offsets, plus a dense
 * sweep of the first virtio-mmio slot (0xd0000000, every 4 bytes of its 0x200-byte window and the
 * accesses straddling its end). The LAPIC page (0xfee00000) and the I/O APIC page (0xfec00000) are
 * skipped: they belong to the in-kernel irqchip and writing them only reprograms this VM's interrupts.
 * Written value: 0x5a repeated.
 *
 * Output: `RESP <addr> <width> 0x<value>` for every read that did not return all ones (at most 1024
 * lines), then `SCAN samples=<n> reads=<n> writes=<n> resp=<n>` and PASS.
 */
#include "guest.h"

int bh_want_mptable = 0;

#define MAX_RESP_LINES 1024
#define LAPIC_PAGE 0xfee00000UL
#define IOAPIC_PAGE 0xfec00000UL
#define VIRTIO0 0xd0000000UL

static uint32_t resp, reads, writes;

static void report(uint64_t a, int width, uint64_t v, uint64_t ones) {
    if (v == ones)
        return;
    if (resp < MAX_RESP_LINES)
        printf("RESP 0x%lx %d 0x%lx\n", a, width, v);
    resp++;
}

static int skipped(uint64_t a) {
    uint64_t page = a & ~0xfffUL, last = (a + 7) & ~0xfffUL;
    return page == LAPIC_PAGE || page == IOAPIC_PAGE || last == LAPIC_PAGE || last == IOAPIC_PAGE;
}

static void probe(uint64_t a) {
    if (skipped(a) || a + 8 > 0x100000000UL)
        return;
    report(a, 1, mmio_read8(a), 0xff);
    report(a, 2, mmio_read16(a), 0xffff);
    report(a, 4, mmio_read32(a), 0xffffffffUL);
    report(a, 8, mmio_read64(a), ~0UL);
    reads += 4;
    mmio_write8(a, 0x5a);
    mmio_write16(a, 0x5a5a);
    mmio_write32(a, 0x5a5a5a5aU);
    mmio_write64(a, 0x5a5a5a5a5a5a5a5aUL);
    writes += 4;
}

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    uint32_t samples = 0;
    printf("SCAN start\n");
    for (uint64_t i = 0; i < 0x4000; i++) {
        uint64_t a = 0xc0000000UL + (i << 16) + ((i * 0x98) & 0xfff);
        probe(a);
        samples++;
    }
    for (uint64_t off = 0; off < 0x200; off += 4) {
        probe(VIRTIO0 + off);
        samples++;
    }
    static const uint64_t edges[] = {VIRTIO0 + 0x1fc, VIRTIO0 + 0x1fd, VIRTIO0 + 0x1fe, VIRTIO0 + 0x1ff,
                                     VIRTIO0 + 0xff8, VIRTIO0 + 0x1000 - 1, 0xfffffff8UL, 0xbffffffcUL};
    for (unsigned k = 0; k < sizeof(edges) / sizeof(edges[0]); k++) {
        probe(edges[k]);
        samples++;
    }
    printf("SCAN samples=%u reads=%u writes=%u resp=%u\n", samples, reads, writes, resp);
    printf("PASS\n");
    return 0;
}
