/* Application-processor start-up: INIT-SIPI-SIPI through the xAPIC (or x2APIC MSRs when enabled). */
#include "guest.h"

extern const char bh_trampoline_start[], bh_trampoline_end[];
uint64_t bh_ap_stack_top; /* read by bh_ap_entry64 */

#define AP_STACK_SIZE 8192
#define AP_STACKS 16
/* .bss.noclear.*: not zeroed at boot (zeroing is emulated ring-0 work); see guest.ld. */
static uint8_t ap_stacks[AP_STACKS][AP_STACK_SIZE] __attribute__((aligned(16), section(".bss.noclear.apstacks")));
static unsigned ap_slot;
static void (*volatile ap_fn)(uint32_t);
static volatile uint32_t ap_checked_in;

static inline void wrmsr(uint32_t msr, uint64_t v) {
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}

static int x2apic(void) { return (rdmsr(0x1b) >> 10) & 1; }

static void apic_write(unsigned reg, uint32_t v) {
    if (x2apic())
        wrmsr(0x800 + (reg >> 4), v);
    else
        mmio_write32(BH_LAPIC_BASE + reg, v);
}

static uint32_t apic_read(unsigned reg) {
    if (x2apic())
        return (uint32_t)rdmsr(0x800 + (reg >> 4));
    return mmio_read32(BH_LAPIC_BASE + reg);
}

static void send_ipi(uint8_t apic_id, uint32_t low) {
    if (x2apic()) {
        wrmsr(0x830, ((uint64_t)apic_id << 32) | low);
        return;
    }
    mmio_write32(BH_LAPIC_BASE + 0x310, (uint32_t)apic_id << 24);
    mmio_write32(BH_LAPIC_BASE + 0x300, low);
    for (int i = 0; i < 1000 && (mmio_read32(BH_LAPIC_BASE + 0x300) & (1u << 12)); i++)
        cpu_relax();
}

void bh_ap_main(void);
void bh_ap_main(void) {
    void (*fn)(uint32_t) = ap_fn;
    __atomic_store_n(&ap_checked_in, 1, __ATOMIC_SEQ_CST);
    if (fn)
        fn(bh_apic_id());
    bh_halt();
}

static int wait_checked_in(uint64_t us) {
    uint64_t start = rdtsc();
    while (!__atomic_load_n(&ap_checked_in, __ATOMIC_SEQ_CST)) {
        if (rdtsc() - start >= us * 4000)
            return 0;
        cpu_relax();
    }
    return 1;
}

int bh_start_ap(uint8_t apic_id, void (*fn)(uint32_t apic_id), uint64_t timeout_us) {
    if (ap_slot >= AP_STACKS)
        return 0;
    size_t tlen = (size_t)(bh_trampoline_end - bh_trampoline_start);
    memcpy((void *)BH_TRAMPOLINE_ADDR, bh_trampoline_start, tlen);
    bh_ap_stack_top = (uint64_t)(uintptr_t)&ap_stacks[ap_slot][AP_STACK_SIZE];
    ap_slot++;
    ap_fn = fn;
    ap_checked_in = 0;
    __asm__ volatile("" ::: "memory"); /* stack, fn and trampoline are in memory before any IPI */
    apic_write(0xf0, apic_read(0xf0) | 0x1ff); /* software-enable, spurious vector 0xff */
    uint32_t vector = (uint32_t)(BH_TRAMPOLINE_ADDR >> 12);
    send_ipi(apic_id, 0x00004500); /* INIT, assert, edge */
    bh_udelay(10000);
    for (int attempt = 0; attempt < 2; attempt++) {
        send_ipi(apic_id, 0x00004600 | vector); /* STARTUP */
        if (wait_checked_in(attempt == 0 ? 200 : timeout_us))
            return 1;
    }
    return 0;
}
