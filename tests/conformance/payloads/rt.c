/* Console, exit, boot-info access for the conformance payloads (see rt.h). */
#include "rt.h"

#define COM1 0x3f8

void putc_(char c) {
    for (int i = 0; i < 2000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
}

void puts_(const char *s) {
    while (*s)
        putc_(*s++);
}

void nl(void) { puts_("\r\n"); }

void puthex(u64 v) {
    char buf[19];
    int n = 0;
    buf[n++] = '0';
    buf[n++] = 'x';
    int started = 0;
    for (int sh = 60; sh >= 0; sh -= 4) {
        unsigned d = (v >> sh) & 0xf;
        if (d || started || sh == 0) {
            buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
            started = 1;
        }
    }
    buf[n] = 0;
    puts_(buf);
}

void putdec(u64 v) {
    char buf[21];
    int n = 20;
    buf[n] = 0;
    do {
        buf[--n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_(buf + n);
}

void kv(const char *key, u64 v) {
    putc_(' ');
    puts_(key);
    putc_('=');
    puthex(v);
}

void kvd(const char *key, u64 v) {
    putc_(' ');
    puts_(key);
    putc_('=');
    putdec(v);
}

void exit_(u32 code) {
    outl(0xf4, code);
    for (;;)
        __asm__ volatile("cli; hlt");
}

int ustrncmp(const char *a, const char *b, u64 n) {
    for (u64 i = 0; i < n; i++) {
        if (a[i] != b[i])
            return (u8)a[i] - (u8)b[i];
        if (!a[i])
            return 0;
    }
    return 0;
}

void *umemcpy(void *d, const void *s, u64 n) {
    u8 *dd = d;
    const u8 *ss = s;
    while (n--)
        *dd++ = *ss++;
    return d;
}

u64 boot_info(void) {
    u32 p = entry_state[ES_PROTO];
    if (p == 1)
        return entry_state[ES_EBX];
    return entry_state[ES_ESI] | ((u64)(p == 2 ? entry_state[ES_RSI_HI] : 0) << 32);
}

const char *cmdline(void) {
    u64 info = boot_info();
    u64 addr;
    if (!info)
        return "";
    if (entry_state[ES_PROTO] == 1)
        addr = *(volatile u64 *)(info + 24); /* hvm_start_info.cmdline_paddr */
    else
        addr = *(volatile u32 *)(info + 0x228) | ((u64) * (volatile u32 *)(info + 0xc8) << 32);
    if (!addr || addr >= (3ul << 30))
        return "";
    return (const char *)addr;
}

int cmdline_has(const char *word) {
    const char *c = cmdline();
    u64 n = 0;
    while (word[n])
        n++;
    while (*c) {
        while (*c == ' ')
            c++;
        const char *start = c;
        while (*c && *c != ' ')
            c++;
        if ((u64)(c - start) == n && !ustrncmp(start, word, n))
            return 1;
    }
    return 0;
}

/* The SMP payload defines these; others never start an AP. */
__attribute__((weak)) u64 ap_stack_top;
void ap_main(void);
__attribute__((weak)) void ap_main(void) {
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ---- ACPI (ACPI 6.5 5.2.5: RSDP; 5.2.8 XSDT; 5.2.7 RSDT) ---- */
static int sig_eq(const void *p, const char *sig, int n) { return !ustrncmp((const char *)p, sig, (u64)n); }

const char *rsdp_via = "none";

u64 find_rsdp(void) {
    u64 info = boot_info();
    u64 addr = 0;
    if (info && entry_state[ES_PROTO] == 1 && *(volatile u32 *)(info + 4) >= 1) {
        addr = *(volatile u64 *)(info + 32); /* hvm_start_info.rsdp_paddr */
        rsdp_via = "start_info";
    } else if (info && entry_state[ES_PROTO] != 1) {
        addr = *(volatile u64 *)(info + 0x70); /* boot_params.acpi_rsdp_addr */
        rsdp_via = "boot_params";
    }
    if (addr && addr < (1ul << 32) && sig_eq((void *)addr, "RSD PTR ", 8))
        return addr;
    rsdp_via = "scan";
    for (u64 a = 0xe0000; a < 0x100000; a += 16)
        if (sig_eq((void *)a, "RSD PTR ", 8))
            return a;
    rsdp_via = "none";
    return 0;
}

int acpi_sum_ok(u64 addr, u32 len) {
    u8 s = 0;
    for (u32 i = 0; i < len; i++)
        s = (u8)(s + *(volatile u8 *)(addr + i));
    return s == 0;
}

/* The n-th table listed by the XSDT (or the RSDT for a revision 0 RSDP); 0 past the end. */
u64 acpi_root_entry(u64 rsdp, unsigned n) {
    u8 rev = *(u8 *)(rsdp + 15);
    u64 root = rev >= 2 ? *(u64 *)(rsdp + 24) : *(u32 *)(rsdp + 16);
    if (!root)
        return 0;
    u32 len = *(u32 *)(root + 4);
    unsigned width = rev >= 2 ? 8 : 4;
    if (36 + (u64)(n + 1) * width > len)
        return 0;
    return width == 8 ? *(u64 *)(root + 36 + n * 8) : *(u32 *)(root + 36 + n * 4);
}

u64 acpi_find(u64 rsdp, const char *sig) {
    for (unsigned i = 0; i < 64; i++) {
        u64 t = acpi_root_entry(rsdp, i);
        if (!t)
            return 0;
        if (sig_eq((void *)t, sig, 4))
            return t;
    }
    return 0;
}

/* APIC ids of the enabled Processor Local APIC entries of the MADT; returns how many (at most max). */
unsigned madt_apic_ids(u64 madt, u8 *ids, unsigned max, unsigned *ioapics) {
    u32 len = *(u32 *)(madt + 4);
    unsigned n = 0;
    *ioapics = 0;
    for (u64 p = madt + 44; p + 2 <= madt + len;) {
        u8 type = *(u8 *)p, l = *(u8 *)(p + 1);
        if (l < 2)
            break;
        if (type == 0 && (*(u32 *)(p + 4) & 1) && n < max)
            ids[n++] = *(u8 *)(p + 3);
        if (type == 1)
            (*ioapics)++;
        p += l;
    }
    return n;
}
