/* Loads an IDT with limit 0 and executes ud2: #UD cannot be delivered -> #GP -> #DF -> triple fault.
 * (int3 / int n are avoided: KVM's emulator fails on them on PVM hosts.) */
#include "guest.h"

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } idt = {0, 0};
    printf("TRIPLEFAULT now\n");
    __asm__ volatile("lidt %0; ud2" ::"m"(idt) : "memory");
    printf("FAIL survived the triple fault\n");
    return 1;
}
