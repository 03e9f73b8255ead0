/* Red team: every one of the 65,536 I/O ports, read and written at widths 1, 2 and 4.
 *
 * Reads go to every port. Writes skip the accesses that would legitimately stop this VM or spam
 * the console: those starting at 0xf4-0xf7 (debug-exit: any write ends the VM) or at 0x64 (the
 * i8042 command port, 0xfe resets the VM), and those starting at 0x3f8-0x3ff (COM1, our console).
 * Accesses that straddle into those ranges (e.g. outw 0xf3, outl 0x61) ARE issued: the bus must
 * contain them. Written value: 0x5a / 0x5a5a / 0x5a5a5a5a.
 *
 * Output: `RESP <port> <width> 0x<value>` for every read that did not return all ones (at most
 * 400 lines, the rest only counted), then `SCAN reads=<n> writes=<n> resp=<n>` and PASS.
 */
#include "guest.h"

int bh_want_mptable = 0;

#define MAX_RESP_LINES 400

static uint32_t resp;

static void report(uint32_t port, int width, uint32_t v, uint32_t ones) {
    if (v == ones)
        return;
    if (resp < MAX_RESP_LINES)
        printf("RESP 0x%x %d 0x%x\n", port, width, v);
    resp++;
}

static int skip_write(uint32_t p) {
    return (p >= 0xf4 && p <= 0xf7) || p == 0x64 || (p >= 0x3f8 && p <= 0x3ff);
}

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    uint32_t reads = 0, writes = 0;
    printf("SCAN start\n");
    for (uint32_t p = 0; p < 0x10000; p++) {
        uint16_t port = (uint16_t)p;
        report(p, 1, inb(port), 0xff);
        report(p, 2, inw(port), 0xffff);
        report(p, 4, inl(port), 0xffffffffU);
        reads += 3;
        if (!skip_write(p)) {
            outb(port, 0x5a);
            outw(port, 0x5a5a);
            outl(port, 0x5a5a5a5aU);
            writes += 3;
        }
    }
    printf("SCAN reads=%u writes=%u resp=%u\n", reads, writes, resp);
    printf("PASS\n");
    return 0;
}
