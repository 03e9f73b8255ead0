/* Density benchmark guest: print IDLE, then sleep for ever with interrupts enabled (the legacy PIC masked,
 * no timer programmed), so neither VMM stops it and it burns no CPU. */
#include "guest.h"

int bh_want_mptable = 0;

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    outb(0x21, 0xff); /* mask every line of both 8259s */
    outb(0xa1, 0xff);
    printf("IDLE\n");
    for (;;)
        __asm__ volatile("sti; hlt");
}
