/* Reports the boot facts the guest found, tersely, for assertions (format: tests/payloads/README.md). */
#include "guest.h"

int main(const struct bh_bootinfo *bi) {
    printf("BOOT protocol=%s info=0x%lx valid=%d\n", bh_protocol_name(bi->protocol), bi->info_addr, bi->info_valid);
    printf("CMDLINE %s\n", bi->cmdline);
    printf("E820_COUNT %u\n", bi->n_e820);
    for (unsigned i = 0; i < bi->n_e820; i++)
        printf("E820 0x%lx 0x%lx %u\n", bi->e820[i].addr, bi->e820[i].size, bi->e820[i].type);
    if (bi->mp_addr)
        printf("MPTABLE 0x%lx\n", bi->mp_addr);
    else
        printf("MPTABLE none\n");
    printf("CPUS %u\n", bi->ncpus);
    for (unsigned i = 0; i < bi->ncpus; i++)
        printf("MPCPU %u %s\n", bi->apic_ids[i], (int)i == bi->bsp_index ? "bsp" : "ap");
    printf("PASS\n");
    return 0;
}
