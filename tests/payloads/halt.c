/* Prints HALTING and executes cli; hlt: nothing can ever wake it (the VMM must stop the VM with its
 * "halted" reason). With `mode=int3` it executes int3 instead, with no IDT: on hardware KVM that is a
 * triple fault; KVM's instruction emulator on PVM hosts fails on it (an internal error). */
#include "guest.h"

int main(const struct bh_bootinfo *bi) {
    char mode[16] = "";
    bh_cmdline_get(bi->cmdline, "mode", mode, sizeof mode);
    if (mode[0] == 'i') {
        printf("INT3\n");
        __asm__ volatile("lidt %0; int3" : : "m"((struct { uint16_t l; uint64_t b; } __attribute__((packed))){0, 0}));
    }
    printf("HALTING\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}
