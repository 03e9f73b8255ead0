/* Minimal runtime for the conformance payloads (tests/conformance/README.md).
 *
 * Built with the toolchain's defaults: gcc -ffreestanding -nostdlib -static, GNU ld's default linker
 * script (optionally -Ttext=0x100000), no private linker script. crt.S records the CPU state at entry,
 * enters long mode with its own GDT and identity page tables and calls payload_main().
 */
#ifndef CONFORMANCE_RT_H
#define CONFORMANCE_RT_H

/* entry_state[] slots, filled by crt.S before it changes anything */
#define ES_PROTO 0 /* 1 = PVH (32-bit), 2 = Linux 64-bit, 3 = Linux 32-bit (bzImage via real mode) */
#define ES_EAX 1
#define ES_EBX 2
#define ES_ESI 3
#define ES_ESP 4
#define ES_CR0 5
#define ES_CR3 6
#define ES_CR4 7
#define ES_EFLAGS 8
#define ES_EFER 9
#define ES_CS 10
#define ES_DS 11
#define ES_ES 12
#define ES_SS 13
#define ES_FS 14
#define ES_GS 15
#define ES_TR 16
#define ES_GDT_LIMIT 17
#define ES_GDT_BASE 18
#define ES_IDT_LIMIT 19
#define ES_IDT_BASE 20
#define ES_CS_AR 21
#define ES_CS_LIM 22
#define ES_DS_AR 23
#define ES_DS_LIM 24
#define ES_SS_AR 25
#define ES_SS_LIM 26
#define ES_TR_AR 27
#define ES_TR_LIM 28
#define ES_LAR_OK 29 /* unused: LAR/LSL are not emulated by KVM on PVM hosts (emulation failure) */
#define ES_RSI_HI 30
#define ES_SLOTS 32

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_CODE32 0x18
#define SEL_UDATA 0x23
#define SEL_UCODE 0x2b
#define SEL_TSS 0x30

#ifndef __ASSEMBLER__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

extern u32 entry_state[ES_SLOTS];
extern u64 gdt64[];
extern u8 bsp_stack_top[];

int payload_main(void);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }

void putc_(char c);
void puts_(const char *s);
void puthex(u64 v);
void putdec(u64 v);
void kv(const char *key, u64 v);   /* " key=0x<hex>" */
void kvd(const char *key, u64 v);  /* " key=<decimal>" */
void nl(void);
void exit_(u32 code) __attribute__((noreturn));
const char *cmdline(void);         /* from start_info / boot_params, "" when none */
int cmdline_has(const char *word); /* word is a whole space-separated token */
u64 boot_info(void);               /* hvm_start_info (PVH) or boot_params (Linux) address */
int ustrncmp(const char *a, const char *b, u64 n);
extern const char *rsdp_via;        /* "start_info", "boot_params", "scan" or "none" */
u64 find_rsdp(void);                /* ACPI RSDP address, 0 when there is none */
int acpi_sum_ok(u64 addr, u32 len);
u64 acpi_root_entry(u64 rsdp, unsigned n);
u64 acpi_find(u64 rsdp, const char *sig);
unsigned madt_apic_ids(u64 madt, u8 *ids, unsigned max, unsigned *ioapics);
void *umemcpy(void *d, const void *s, u64 n);
#endif
#endif
