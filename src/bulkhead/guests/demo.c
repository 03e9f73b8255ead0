/* The `bulkhead demo` guest: greets, reports what it found, exits with debug-exit code 0. */
#include "guest.h"

static const char *e820_name(uint32_t type) {
    switch (type) {
    case 1:
        return "usable";
    case 2:
        return "reserved";
    case 3:
        return "ACPI data";
    case 4:
        return "ACPI NVS";
    case 5:
        return "unusable";
    }
    return "other";
}

int main(const struct bh_bootinfo *bi) {
    printf("\nHello from a bulkhead guest!\n");
    printf("BOOT protocol=%s\n", bh_protocol_name(bi->protocol));
    printf("CMDLINE %s\n", bi->cmdline);
    uint64_t usable = 0;
    for (unsigned i = 0; i < bi->n_e820; i++) {
        const struct bh_e820 *e = &bi->e820[i];
        if (e->size == 0)
            continue;
        printf("E820 0x%016lx 0x%016lx %u %s\n", e->addr, e->size, e->type, e820_name(e->type));
        if (e->type == 1)
            usable += e->size;
    }
    printf("MEMORY usable_mib=%lu\n", usable >> 20);
    if (bi->mp_addr)
        printf("CPUS %u (from the MP table)\n", bi->ncpus);
    else
        printf("CPUS unknown (no MP table)\n");
    printf("Goodbye.\n");
    return 0;
}
