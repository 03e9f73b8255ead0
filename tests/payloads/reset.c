/* Asks the i8042 keyboard controller for a CPU reset (0xfe to port 0x64), then waits (~1 s at most). */
#include "guest.h"

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    printf("RESET i8042\n");
    outb(0x64, 0xfe);
    bh_udelay(1000000);
    printf("FAIL reset ignored\n");
    return 1;
}
