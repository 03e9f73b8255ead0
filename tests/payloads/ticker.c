/* Snapshot test guest on 2 vCPUs with the LAPIC timer ticking.
 * The BSP arms its LAPIC timer (periodic, vector 0x40) and sleeps in `sti; hlt`; every 4th tick it hands
 * a number to the AP through shared memory, waits for the AP's answer (n*n+1) and prints
 * "TICK n answer=..". A restore that lost the LAPIC timer, the AP's registers, the IDT or the shared
 * memory hangs or prints something else. After count=N rounds (default 12) it prints DONE and exits 0. */
#include "guest.h"

#define TIMER_VECTOR 0x40
#define SPURIOUS_VECTOR 0xff

struct idt_entry {
    uint16_t off_lo, sel;
    uint8_t ist, attr;
    uint16_t off_mid;
    uint32_t off_hi, zero;
} __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(16)));
static volatile uint32_t ticks, turn, answer, ap_up;

struct frame;
__attribute__((interrupt)) static void timer_isr(struct frame *f) {
    (void)f;
    ticks++;
    mmio_write32(BH_LAPIC_BASE + 0xb0, 0); /* EOI */
}
__attribute__((interrupt)) static void spurious_isr(struct frame *f) { (void)f; }

static void set_gate(int vec, void (*fn)(struct frame *)) {
    uint64_t a = (uint64_t)fn;
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    idt[vec] = (struct idt_entry){(uint16_t)a, cs, 0, 0x8e, (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0};
}

static void ap_main(uint32_t id) {
    (void)id;
    ap_up = 1;
    uint32_t seen = 0;
    for (;;) {
        uint32_t t = turn;
        if (t != seen) {
            seen = t;
            answer = t * t + 1;
        }
        cpu_relax();
    }
}

int main(const struct bh_bootinfo *bi) {
    char buf[16];
    uint64_t count = 12;
    if (bh_cmdline_get(bi->cmdline, "count", buf, sizeof buf))
        bh_parse_u64(buf, &count);
    outb(0x21, 0xff); /* mask both PICs: only the LAPIC timer interrupts */
    outb(0xa1, 0xff);
    set_gate(TIMER_VECTOR, timer_isr);
    set_gate(SPURIOUS_VECTOR, spurious_isr);
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = {sizeof idt - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
    if (!bh_start_ap(1, ap_main, 2000000)) {
        printf("FAIL the AP did not start\n");
        return 1;
    }
    mmio_write32(BH_LAPIC_BASE + 0xf0, 0x100 | SPURIOUS_VECTOR); /* software enable */
    mmio_write32(BH_LAPIC_BASE + 0x3e0, 0x3);                    /* divide by 16 */
    mmio_write32(BH_LAPIC_BASE + 0x320, (1u << 17) | TIMER_VECTOR); /* periodic */
    mmio_write32(BH_LAPIC_BASE + 0x380, 0x80000);
    printf("START cpus=2\n");
    for (uint32_t n = 1; n <= count; n++) {
        while (ticks < n * 4)
            __asm__ volatile("sti; hlt; cli");
        turn = n;
        while (answer != n * n + 1)
            cpu_relax();
        printf("TICK %u answer=%u\n", n, answer);
    }
    mmio_write32(BH_LAPIC_BASE + 0x320, 1u << 16); /* mask the timer */
    printf("DONE\n");
    return 0;
}
