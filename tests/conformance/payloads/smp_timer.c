/* SMP start-up and the LAPIC timer.
 * 1. The memory map (PVH memmap or boot_params e820) must mark the AP trampoline page 0x70000 usable.
 * 2. Every MADT processor other than the BSP is started with INIT-SIPI-SIPI (vector 0x70); each AP
 *    checks in from long mode and prints its APIC id.
 * 3. The BSP arms the LAPIC timer (periodic, vector 0x40) and sleeps in `sti; hlt` until 5 ticks.
 * Lines: TRAMPOLINE, CPUS, APIC, CPUS_UP, TIMER, PASS/FAIL. Format: README.md. */
#include "rt.h"

#define LAPIC 0xfee00000ul
#define TRAMPOLINE 0x70000ul
#define TIMER_VECTOR 0x40

extern const char trampoline_start[], trampoline_end[];
u64 ap_stack_top;
static u8 ap_stacks[8][8192] __attribute__((aligned(16)));
static volatile u32 cpus_up, console_lock, ticks;

static void lock(void) {
    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
        __asm__ volatile("pause");
}
static void unlock(void) { __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE); }

static u32 apic_id(void) { return mmio_read32(LAPIC + 0x20) >> 24; }

void ap_main(void) {
    lock();
    puts_("APIC");
    kvd("id", apic_id());
    puts_(" ap");
    nl();
    unlock();
    __atomic_add_fetch(&cpus_up, 1, __ATOMIC_SEQ_CST);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void delay_tsc(u64 cycles) {
    u64 t = rdtsc();
    while (rdtsc() - t < cycles)
        __asm__ volatile("pause");
}

static void ipi(u32 id, u32 low) {
    mmio_write32(LAPIC + 0x310, id << 24);
    mmio_write32(LAPIC + 0x300, low);
    for (int i = 0; i < 1000 && (mmio_read32(LAPIC + 0x300) & (1u << 12)); i++)
        __asm__ volatile("pause");
}

/* Is [a, a+len) inside one usable (type 1) entry of the VMM's memory map? */
static int map_usable(u64 a, u64 len, unsigned *entries) {
    u64 info = boot_info();
    if (!info)
        return 0;
    u64 map;
    unsigned n, stride;
    if (entry_state[ES_PROTO] == 1) {
        if (*(volatile u32 *)(info + 4) < 1)
            return 0;
        map = *(volatile u64 *)(info + 40);
        n = *(volatile u32 *)(info + 48);
        stride = 24;
    } else {
        map = info + 0x2d0;
        n = *(volatile u8 *)(info + 0x1e8);
        stride = 20;
    }
    *entries = n;
    for (unsigned i = 0; i < n && i < 128; i++) {
        u64 base = *(u64 *)(map + i * stride), size = *(u64 *)(map + i * stride + 8);
        u32 type = *(u32 *)(map + i * stride + 16);
        if (type == 1 && base <= a && a + len <= base + size)
            return 1;
    }
    return 0;
}

__asm__(".text\ntimer_isr:\n"
        "pushq %rax\n"
        "lock incl ticks(%rip)\n"
        "movq $0xfee000b0, %rax\n"
        "movl $0, (%rax)\n" /* EOI */
        "popq %rax\n"
        "iretq\n");
extern char timer_isr[];
static u64 idt[2 * 256] __attribute__((aligned(16)));

int payload_main(void) {
    unsigned entries = 0;
    int usable = map_usable(TRAMPOLINE, 0x1000, &entries);
    puts_("TRAMPOLINE");
    kv("addr", TRAMPOLINE);
    kvd("usable", usable);
    kvd("map_entries", entries);
    nl();
    u64 rsdp = find_rsdp();
    u64 madt = rsdp ? acpi_find(rsdp, "APIC") : 0;
    u8 ids[8];
    unsigned ioapics, ncpus = madt ? madt_apic_ids(madt, ids, 8, &ioapics) : 0;
    u32 me = apic_id();
    puts_("CPUS");
    kvd("madt", ncpus);
    nl();
    puts_("APIC");
    kvd("id", me);
    puts_(" bsp");
    nl();
    cpus_up = 1;
    mmio_write32(LAPIC + 0xf0, mmio_read32(LAPIC + 0xf0) | 0x1ff); /* enable, spurious 0xff */
    if (usable) {
        umemcpy((void *)TRAMPOLINE, trampoline_start, (u64)(trampoline_end - trampoline_start));
        for (unsigned i = 0, slot = 0; i < ncpus; i++) {
            if (ids[i] == me)
                continue;
            u32 before = cpus_up;
            ap_stack_top = (u64)&ap_stacks[slot++][8192];
            __asm__ volatile("" ::: "memory");
            ipi(ids[i], 0x4500); /* INIT */
            delay_tsc(10000000);
            for (int s = 0; s < 2 && cpus_up == before; s++) {
                ipi(ids[i], 0x4600 | (TRAMPOLINE >> 12)); /* STARTUP */
                u64 t = rdtsc();
                while (cpus_up == before && rdtsc() - t < 4000000000ul)
                    __asm__ volatile("pause");
            }
            if (cpus_up == before) {
                lock();
                puts_("AP_TIMEOUT");
                kvd("id", ids[i]);
                nl();
                unlock();
            }
        }
    }
    lock();
    puts_("CPUS_UP");
    kvd("n", cpus_up);
    nl();
    unlock();

    /* LAPIC timer: periodic, divide by 16, vector 0x40; count hlt wake-ups. */
    u64 h = (u64)timer_isr;
    idt[2 * TIMER_VECTOR] = (h & 0xffff) | ((u64)SEL_KCODE << 16) | (0x8eul << 40) | ((h >> 16 & 0xffff) << 48);
    idt[2 * TIMER_VECTOR + 1] = h >> 32;
    struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } p = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(p));
    mmio_write32(LAPIC + 0x3e0, 0x3);                         /* divide by 16 */
    mmio_write32(LAPIC + 0x320, (1u << 17) | TIMER_VECTOR);   /* periodic */
    mmio_write32(LAPIC + 0x380, 200000);                      /* initial count */
    unsigned halts = 0;
    u64 t0 = rdtsc();
    while (ticks < 5 && halts < 1000 && rdtsc() - t0 < 20000000000ul) {
        __asm__ volatile("sti; hlt; cli");
        halts++;
    }
    mmio_write32(LAPIC + 0x320, 1u << 16); /* mask */
    lock();
    puts_("TIMER");
    kvd("ticks", ticks);
    kvd("hlt_wakeups", halts);
    nl();
    int ok = usable && ncpus >= 1 && cpus_up == ncpus && ticks >= 5 && halts >= 5;
    puts_(ok ? "PASS" : "FAIL");
    nl();
    unlock();
    return ok ? 0 : 1;
}
