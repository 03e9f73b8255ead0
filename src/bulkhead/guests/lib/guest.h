/*
 * bulkhead guest library: a tiny freestanding runtime for test, demo and benchmark payloads.
 *
 * Every payload defines `int main(const struct bh_bootinfo *bi)`; the entry code (entry.S) reaches
 * it in 64-bit long mode with identity paging of 0..4 GiB, whichever boot protocol was used:
 *   - Linux 64-bit boot protocol: ELF e_entry / bzImage protected-mode part + 0x200, RSI = boot_params
 *   - Linux 32-bit boot protocol: protected-mode part + 0x000 (code32_start), ESI = boot_params
 *   - PVH: XEN_ELFNOTE_PHYS32_ENTRY, 32-bit protected mode, paging off, EBX = hvm_start_info
 * main's return value is written to the debug-exit port (see bh_exit).
 *
 * All code here runs in ring 0, which PVM-based KVM emulates (~0.4 M instructions/s): keep loops short.
 */
#ifndef BULKHEAD_GUEST_H
#define BULKHEAD_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define BH_BOOT_LINUX64 1
#define BH_BOOT_LINUX32 2
#define BH_BOOT_PVH 3

#define BH_COM1 0x3f8
#define BH_DEBUG_EXIT_PORT 0xf4
#define BH_LAPIC_BASE 0xfee00000UL
#define BH_TRAMPOLINE_ADDR 0x70000UL /* AP real-mode trampoline page (SIPI vector 0x70) */

#define BH_CMDLINE_MAX 4096 /* bytes kept, including the terminating NUL */
#define BH_E820_MAX 128
#define BH_MAX_CPUS 64

struct bh_e820 {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
};

struct bh_bootinfo {
    int protocol;         /* BH_BOOT_* */
    uint64_t info_addr;   /* physical address of boot_params or hvm_start_info */
    int info_valid;       /* 0 when the PVH magic was wrong */
    uint64_t cmdline_addr; /* 0 when none was given */
    char cmdline[BH_CMDLINE_MAX];
    unsigned n_e820;
    struct bh_e820 e820[BH_E820_MAX];
    /* Intel MP table */
    uint64_t mp_addr; /* physical address of the "_MP_" floating pointer, 0 when not found */
    unsigned ncpus;   /* enabled processor entries */
    uint8_t apic_ids[BH_MAX_CPUS];
    int bsp_index;    /* index in apic_ids of the entry flagged BSP, -1 if none */
};

/* Provided by the payload. */
int main(const struct bh_bootinfo *bi);
/* Optional: a payload defining `int bh_want_mptable = 0;` skips the MP table scan (ncpus stays 0). */
extern int bh_want_mptable;

/* Port I/O. */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* MMIO (identity mapped). */
static inline uint8_t mmio_read8(uint64_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_read16(uint64_t a) { return *(volatile uint16_t *)a; }
static inline uint32_t mmio_read32(uint64_t a) { return *(volatile uint32_t *)a; }
static inline uint64_t mmio_read64(uint64_t a) { return *(volatile uint64_t *)a; }
static inline void mmio_write8(uint64_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_write16(uint64_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline void mmio_write32(uint64_t a, uint32_t v) { *(volatile uint32_t *)a = v; }
static inline void mmio_write64(uint64_t a, uint64_t v) { *(volatile uint64_t *)a = v; }

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline uint64_t rdmsr(uint32_t msr) {
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* Spinlock (xchg only). */
typedef struct { volatile uint32_t v; } bh_lock_t;
void bh_lock(bh_lock_t *l);
void bh_unlock(bh_lock_t *l);

/* Serial console (COM1, polled) and printf: %s %c %d %i %u %x %X %p %% with l/ll/z, width, '0', '-'. */
void serial_putc(char c); /* '\n' is sent as "\r\n" */
void serial_write(const char *s);
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);

/* Exit through the QEMU isa-debug-exit compatible port 0xf4 (process status (code << 1) | 1).
 * If no such device exists the CPU halts forever with interrupts disabled. */
__attribute__((noreturn)) void bh_exit(uint32_t code);
__attribute__((noreturn)) void bh_halt(void);

/* Strings. */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* Command line: value of `key=` (copied into out, NUL-terminated), 1 if found, 0 if not. */
int bh_cmdline_get(const char *cmdline, const char *key, char *out, size_t outlen);
/* Parse decimal or 0x-hex; returns 1 on success. */
int bh_parse_u64(const char *s, uint64_t *out);
const char *bh_protocol_name(int protocol);

/* Time: busy-wait using the TSC (assumes at most 4 GHz, so waits are at least as long as asked). */
void bh_udelay(uint64_t us);

/* SMP (lib/smp.c): start the AP with this APIC id via INIT-SIPI-SIPI through the trampoline at
 * BH_TRAMPOLINE_ADDR; it runs fn(apic_id) on its own stack and then halts. Returns 1 once the AP
 * checked in, 0 on timeout (timeout_us). Call for one AP at a time. */
int bh_start_ap(uint8_t apic_id, void (*fn)(uint32_t apic_id), uint64_t timeout_us);
uint32_t bh_apic_id(void); /* this CPU's initial APIC id (CPUID leaf 1) */

#endif
