/* Ring 3 on the VMM's boot TSS, or on a guest-built TSS with an I/O permission bitmap.
 *
 * mode boot_tss (default): RFLAGS.IOPL = 3, iretq to ring 3 with TR left as the VMM handed it over;
 *   ring 3 prints through COM1 (port I/O), reads MXCSR and the x87 control word (natively: in ring 0
 *   KVM would have to emulate them), and exits through port 0xf4.
 * mode iobitmap (cmdline word "iobitmap"): the guest loads its own TSS whose I/O bitmap allows only
 *   COM1 (0x3f8-0x3ff) and the exit port (0xf4-0xf7), with IOPL 0; ring 3 prints, then writes port
 *   0x80, which must raise #GP (handled in ring 0 on the TSS's RSP0 stack).
 * An exception prints "FAULT vector=<n> err=0x.. rip=0x.. cpl=<n>". Format: README.md. */
#include "rt.h"

#define RSP0_STACK 8192
static u8 kstack[RSP0_STACK] __attribute__((aligned(16)));
static u8 ustack[8192] __attribute__((aligned(16)));

struct __attribute__((packed)) tss64 {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
    u8 bitmap[8192];
    u8 terminator;
};
static struct tss64 guest_tss = {.iomap_base = 104, .bitmap = {[0 ... 8191] = 0xff}, .terminator = 0xff};

struct __attribute__((packed)) gate {
    u16 off0, sel;
    u8 ist, attr;
    u16 off1;
    u32 off2, zero;
};
static struct gate idt[32] __attribute__((aligned(16)));
static volatile int expect_gp;

/* exception stubs: vector and error code (0 when the CPU pushes none) -> fault(vector, err, frame) */
#define STUB(v, has_err)                                                                              \
    __asm__(".text\n.globl isr" #v "\nisr" #v ":\n" has_err "pushq $" #v "\njmp isr_common\n");
STUB(0, "pushq $0\n")
STUB(6, "pushq $0\n")
STUB(8, "")
STUB(10, "")
STUB(11, "")
STUB(12, "")
STUB(13, "")
STUB(14, "")
__asm__(".text\nisr_common:\n"
        "popq %rdi\n"          /* vector */
        "popq %rsi\n"          /* error code */
        "movq %rsp, %rdx\n"    /* -> rip, cs, rflags, rsp, ss */
        "andq $-16, %rsp\n"
        "call fault\n");
extern char isr0[], isr6[], isr8[], isr10[], isr11[], isr12[], isr13[], isr14[];

void fault(u64 vector, u64 err, const u64 *frame) __attribute__((noreturn));
void fault(u64 vector, u64 err, const u64 *frame) {
    puts_("FAULT");
    kvd("vector", vector);
    kv("err", err);
    kv("rip", frame[0]);
    kvd("cpl", frame[1] & 3);
    nl();
    if (expect_gp && vector == 13 && (frame[1] & 3) == 3) {
        puts_("DENIED port=0x80 faulted");
        nl();
        puts_("PASS");
        nl();
        exit_(0);
    }
    exit_(3);
}

static void set_gate(int v, void *handler) {
    u64 a = (u64)handler;
    idt[v] = (struct gate){(u16)a, SEL_KCODE, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
}

static void load_idt(void) {
    void *h[] = {isr0, isr6, isr8, isr10, isr11, isr12, isr13, isr14};
    int v[] = {0, 6, 8, 10, 11, 12, 13, 14};
    for (int i = 0; i < 8; i++)
        set_gate(v[i], h[i]);
    struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } p = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(p));
}

static u16 cpl(void) {
    u16 cs;
    __asm__ volatile("movw %%cs, %0" : "=r"(cs));
    return cs & 3;
}

static u64 rflags(void) {
    u64 f;
    __asm__ volatile("pushfq; popq %0" : "=r"(f));
    return f;
}

static void ring3_main(void) __attribute__((noreturn, used));
static void ring3_main(void) {
    u32 mxcsr = 0;
    u16 fcw = 0;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fcw));
    puts_("RING3");
    kvd("cpl", cpl());
    kvd("iopl", (rflags() >> 12) & 3);
    kv("mxcsr", mxcsr);
    kv("fcw", fcw);
    nl();
    if (expect_gp) {
        outb(0x80, 0x5a); /* denied by the bitmap: #GP */
        puts_("FAIL port 0x80 was allowed");
        nl();
        exit_(1);
    }
    puts_("PASS");
    nl();
    exit_(0);
}

static void enter_ring3(u64 flags) __attribute__((noreturn));
static void enter_ring3(u64 flags) {
    __asm__ volatile("pushq %[ss]\n\tpushq %[rsp]\n\tpushq %[fl]\n\tpushq %[cs]\n\tpushq %[rip]\n\tiretq"
                     :
                     : [ss] "i"(SEL_UDATA), [rsp] "r"((u64)&ustack[sizeof(ustack)]), [fl] "r"(flags),
                       [cs] "i"(SEL_UCODE), [rip] "r"((u64)ring3_main)
                     : "memory");
    __builtin_unreachable();
}

/* Base of the TSS the VMM left in TR: from its GDT descriptor, or 0 for a null selector (the
 * architectural reset value of TR, which QEMU's firmware leaves in place). */
static u64 boot_tss_base(void) {
    u32 sel = entry_state[ES_TR] & ~7u;
    if (!sel)
        return 0;
    const u8 *d = (const u8 *)(u64)(entry_state[ES_GDT_BASE] + sel);
    u64 base = d[2] | (d[3] << 8) | (d[4] << 16) | ((u64)d[7] << 24);
    if (entry_state[ES_PROTO] != 1)
        base |= (u64)(*(const u32 *)(d + 8)) << 32;
    return base;
}

int payload_main(void) {
    load_idt();
    if (cmdline_has("iobitmap")) {
        guest_tss.rsp[0] = (u64)&kstack[RSP0_STACK];
        guest_tss.bitmap[0x3f8 / 8] = 0x00;
        guest_tss.bitmap[0xf4 / 8] &= 0x0f;
        u64 base = (u64)&guest_tss, limit = sizeof(guest_tss) - 1;
        gdt64[SEL_TSS >> 3] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ul << 40) |
                              (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
        gdt64[(SEL_TSS >> 3) + 1] = base >> 32;
        __asm__ volatile("ltr %w0" ::"r"(SEL_TSS));
        expect_gp = 1;
        puts_("TSS guest base=");
        puthex(base);
        kv("limit", limit);
        nl();
        enter_ring3(0x0002);
    }
    /* The boot TSS's RSP0 must point at a stack for exceptions from ring 3 to be reported. */
    u64 base = boot_tss_base();
    *(volatile u64 *)(base + 4) = (u64)&kstack[RSP0_STACK];
    puts_("TSS boot");
    kvd("selector", entry_state[ES_TR]);
    kv("base", base);
    nl();
    enter_ring3(0x3002);
}
