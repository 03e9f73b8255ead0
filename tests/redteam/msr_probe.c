/* Red team: RDMSR/WRMSR probing for host information, with a #GP handler so that MSRs the VM does
 * not have raise #GP inside the guest (contained) instead of stopping it.
 *
 * The payload loads its own IDT whose #GP (vector 13) gate points at gp_entry: it drops the error
 * code, skips the 2-byte rdmsr/wrmsr and records the fault. Every other vector is absent (a fault
 * there triple-faults, which the test would see as a stop reason other than debug-exit).
 *
 * Output: `MSR 0x<index> gp` or `MSR 0x<index> val=0x<value>` per read; `WRMSR 0x<index> gp|ok`
 * per write; `GP_COUNT <n>`; PASS.
 */
#include "guest.h"

int bh_want_mptable = 0;

volatile uint32_t gp_count;
volatile uint32_t gp_flag;

__asm__(".text\n"
        ".global gp_entry\n"
        "gp_entry:\n"
        "  addq $8, %rsp\n"          /* error code */
        "  addq $2, (%rsp)\n"        /* skip rdmsr / wrmsr (0f 32 / 0f 30) */
        "  movl $1, gp_flag(%rip)\n"
        "  lock incl gp_count(%rip)\n"
        "  iretq\n");
extern char gp_entry[];

struct __attribute__((packed)) gate {
    uint16_t off0, sel;
    uint8_t ist, type;
    uint16_t off1;
    uint32_t off2, zero;
};
static struct gate idt[32] __attribute__((aligned(16)));

static int rd(uint32_t msr, uint64_t *v) {
    uint32_t lo = 0, hi = 0;
    gp_flag = 0;
    __asm__ volatile("rdmsr" : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
    *v = ((uint64_t)hi << 32) | lo;
    return gp_flag ? -1 : 0;
}

static int wr(uint32_t msr, uint64_t v) {
    gp_flag = 0;
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
    return gp_flag ? -1 : 0;
}

static const uint32_t msrs[] = {
    0x10,       /* IA32_TSC */
    0x17,       /* IA32_PLATFORM_ID */
    0x1b,       /* IA32_APIC_BASE */
    0x3a,       /* IA32_FEATURE_CONTROL */
    0x8b,       /* IA32_BIOS_SIGN_ID (microcode revision) */
    0xc1,       /* IA32_PMC0 */
    0xce,       /* MSR_PLATFORM_INFO */
    0x10a,      /* IA32_ARCH_CAPABILITIES */
    0x198,      /* IA32_PERF_STATUS */
    0x19c,      /* IA32_THERM_STATUS */
    0x1a0,      /* IA32_MISC_ENABLE */
    0x1ad,      /* MSR_TURBO_RATIO_LIMIT */
    0x2ff,      /* IA32_MTRR_DEF_TYPE */
    0x606,      /* MSR_RAPL_POWER_UNIT */
    0x611,      /* MSR_PKG_ENERGY_STATUS */
    0x639,      /* MSR_PP0_ENERGY_STATUS */
    0x641,      /* MSR_PP1_ENERGY_STATUS */
    0xc0000080, /* EFER */
    0xc0010015, /* AMD HWCR */
    0x4b564d00, /* KVM wall clock (new) */
    0x40000200, /* beyond the hypervisor range KVM implements */
    0x12345678, /* does not exist */
    0xdeadbeef, /* does not exist */
    0xffffffff, /* does not exist */
};

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    uint64_t h = (uint64_t)gp_entry;
    idt[13] = (struct gate){(uint16_t)h, cs, 0, 0x8e, (uint16_t)(h >> 16), (uint32_t)(h >> 32), 0};
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } idtr = {sizeof(idt) - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr) : "memory");

    for (unsigned i = 0; i < sizeof(msrs) / sizeof(msrs[0]); i++) {
        uint64_t v;
        if (rd(msrs[i], &v))
            printf("MSR 0x%x gp\n", msrs[i]);
        else
            printf("MSR 0x%x val=0x%lx\n", msrs[i], v);
    }
    static const uint32_t bad_writes[] = {0x12345678, 0xdeadbeef, 0x40000200, 0xce};
    for (unsigned i = 0; i < sizeof(bad_writes) / sizeof(bad_writes[0]); i++)
        printf("WRMSR 0x%x %s\n", bad_writes[i], wr(bad_writes[i], 0x5a5a5a5a5a5a5a5aUL) ? "gp" : "ok");
    printf("GP_COUNT %u\n", gp_count);
    printf("PASS\n");
    return 0;
}
