/* Starts every AP listed in the MP table (INIT-SIPI-SIPI, trampoline page 0x70000); each CPU
 * reports its APIC id. Format: tests/payloads/README.md. */
#include "guest.h"

static volatile uint32_t cpus_up;

static void ap_report(uint32_t apic_id) {
    printf("APIC %u ap\n", apic_id);
    __atomic_add_fetch(&cpus_up, 1, __ATOMIC_SEQ_CST);
}

int main(const struct bh_bootinfo *bi) {
    uint32_t me = bh_apic_id();
    printf("BOOT protocol=%s\n", bh_protocol_name(bi->protocol));
    printf("CPUS %u\n", bi->ncpus);
    printf("APIC %u bsp\n", me);
    cpus_up = 1;
    for (unsigned i = 0; i < bi->ncpus; i++) {
        uint8_t id = bi->apic_ids[i];
        if (id == me)
            continue;
        uint32_t before = cpus_up;
        if (!bh_start_ap(id, ap_report, 2000000)) {
            printf("AP_TIMEOUT %u\n", id);
            continue;
        }
        /* wait (bounded) until the AP has printed its line */
        uint64_t start = rdtsc();
        while (__atomic_load_n(&cpus_up, __ATOMIC_SEQ_CST) == before && rdtsc() - start < 2000000ULL * 4000)
            cpu_relax();
    }
    uint32_t up = __atomic_load_n(&cpus_up, __ATOMIC_SEQ_CST);
    printf("CPUS_UP %u\n", up);
    if (bi->ncpus == 0) {
        printf("FAIL no MP table processors\n");
        return 1;
    }
    if (up != bi->ncpus) {
        printf("FAIL %u of %u CPUs came up\n", up, bi->ncpus);
        return 1;
    }
    printf("PASS\n");
    return 0;
}
