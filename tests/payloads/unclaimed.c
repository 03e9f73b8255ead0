/* Touches I/O ports and an MMIO address nobody should claim, at every width; prints what it read,
 * writes to them, reads again, and reports PASS when it survived. Format: tests/payloads/README.md. */
#include "guest.h"

static const uint16_t ports[] = {0x200, 0x2f0};
#define MMIO_ADDR 0xc0000000UL /* start of the 32-bit MMIO hole */

static void read_all(const char *tag) {
    for (unsigned i = 0; i < sizeof(ports) / sizeof(ports[0]); i++) {
        uint16_t p = ports[i];
        printf("%s 0x%x 1 0x%x\n", tag, p, inb(p));
        printf("%s 0x%x 2 0x%x\n", tag, p, inw(p));
        printf("%s 0x%x 4 0x%x\n", tag, p, inl(p));
    }
}

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    read_all("PIO");
    printf("MMIO 0x%lx 1 0x%x\n", MMIO_ADDR, mmio_read8(MMIO_ADDR));
    printf("MMIO 0x%lx 2 0x%x\n", MMIO_ADDR, mmio_read16(MMIO_ADDR));
    printf("MMIO 0x%lx 4 0x%x\n", MMIO_ADDR, mmio_read32(MMIO_ADDR));
    printf("MMIO 0x%lx 8 0x%lx\n", MMIO_ADDR, mmio_read64(MMIO_ADDR));
    for (unsigned i = 0; i < sizeof(ports) / sizeof(ports[0]); i++) {
        outb(ports[i], 0x5a);
        outw(ports[i], 0x5a5a);
        outl(ports[i], 0x5a5a5a5a);
    }
    mmio_write8(MMIO_ADDR, 0x5a);
    mmio_write16(MMIO_ADDR, 0x5a5a);
    mmio_write32(MMIO_ADDR, 0x5a5a5a5a);
    mmio_write64(MMIO_ADDR, 0x5a5a5a5a5a5a5a5aUL);
    printf("WROTE\n");
    read_all("PIO_AFTER");
    printf("MMIO_AFTER 0x%lx 4 0x%x\n", MMIO_ADDR, mmio_read32(MMIO_ADDR));
    printf("PASS\n");
    return 0;
}
