/* bulkhead guest library: serial console, printf, strings, exit, locks, command line, delays. */
#include "guest.h"

void bh_parse_bootinfo(int protocol, uint64_t info, struct bh_bootinfo *bi); /* bootinfo.c */

static struct bh_bootinfo boot_info;
static bh_lock_t print_lock;

void bh_lock(bh_lock_t *l) {
    for (;;) {
        uint32_t old = 1;
        __asm__ volatile("xchgl %0, %1" : "+r"(old), "+m"(l->v) : : "memory");
        if (old == 0)
            return;
        while (l->v)
            cpu_relax();
    }
}

void bh_unlock(bh_lock_t *l) {
    __asm__ volatile("" ::: "memory");
    l->v = 0;
}

/* ---- serial ---- */
static void serial_raw(char c) {
    /* Poll LSR.THRE, bounded so a missing UART cannot hang the guest. */
    for (int i = 0; i < 100000; i++) {
        if (inb(BH_COM1 + 5) & 0x20)
            break;
        cpu_relax();
    }
    outb(BH_COM1, (uint8_t)c);
}

void serial_putc(char c) {
    if (c == '\n')
        serial_raw('\r');
    serial_raw(c);
}

void serial_write(const char *s) {
    while (*s)
        serial_putc(*s++);
}

/* ---- printf ---- */
static int emit_num(uint64_t v, unsigned base, int upper, int width, int zero, int left, int neg) {
    char buf[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0, out = 0;
    do {
        buf[n++] = digits[v % base];
        v /= base;
    } while (v);
    int len = n + (neg ? 1 : 0);
    if (neg && zero) {
        serial_putc('-');
        out++;
    }
    if (!left)
        for (; len < width; width--, out++)
            serial_putc(zero ? '0' : ' ');
    if (neg && !zero) {
        serial_putc('-');
        out++;
    }
    while (n)
        serial_putc(buf[--n]), out++;
    if (left)
        for (; len < width; width--, out++)
            serial_putc(' ');
    return out;
}

static int vprintf_unlocked(const char *fmt, va_list ap) {
    int out = 0;
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            out++;
            continue;
        }
        fmt++;
        int zero = 0, left = 0, width = 0, lng = 0;
        for (;; fmt++) {
            if (*fmt == '0')
                zero = 1;
            else if (*fmt == '-')
                left = 1;
            else
                break;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z')
            lng++, fmt++;
        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            out += emit_num(u, 10, 0, width, zero, left, v < 0);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            out += emit_num(v, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, zero, left, 0);
            break;
        }
        case 'p':
            serial_write("0x");
            out += 2 + emit_num((uint64_t)(uintptr_t)va_arg(ap, void *), 16, 0, width, zero, left, 0);
            break;
        case 'c':
            serial_putc((char)va_arg(ap, int));
            out++;
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int len = (int)strlen(s);
            if (!left)
                for (; len < width; width--, out++)
                    serial_putc(' ');
            serial_write(s);
            out += len;
            if (left)
                for (; len < width; width--, out++)
                    serial_putc(' ');
            break;
        }
        case '%':
            serial_putc('%');
            out++;
            break;
        case 0:
            return out;
        default:
            serial_putc('%');
            serial_putc(*fmt);
            out += 2;
        }
    }
    return out;
}

int vprintf(const char *fmt, va_list ap) {
    bh_lock(&print_lock);
    int n = vprintf_unlocked(fmt, ap);
    bh_unlock(&print_lock);
    return n;
}

int printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

/* ---- exit ---- */
void bh_halt(void) {
    for (;;)
        __asm__ volatile("cli; hlt");
}

void bh_exit(uint32_t code) {
    outl(BH_DEBUG_EXIT_PORT, code);
    bh_halt();
}

/* ---- strings ---- */
/* rep stosb / rep movsb: one emulated instruction instead of a loop (measured ~4x faster under PVM). */
void *memset(void *d, int c, size_t n) {
    void *p = d;
    __asm__ volatile("rep stosb" : "+D"(p), "+c"(n) : "a"(c) : "memory");
    return d;
}

void *memcpy(void *d, const void *s, size_t n) {
    void *p = d;
    __asm__ volatile("rep movsb" : "+D"(p), "+S"(s), "+c"(n) : : "memory");
    return d;
}

void *memmove(void *d, const void *s, size_t n) {
    uint8_t *a = d;
    const uint8_t *b = s;
    if (a < b)
        while (n--)
            *a++ = *b++;
    else
        while (n--)
            a[n] = b[n];
    return d;
}

int memcmp(const void *x, const void *y, size_t n) {
    const uint8_t *a = x, *b = y;
    for (; n; n--, a++, b++)
        if (*a != *b)
            return *a < *b ? -1 : 1;
    return 0;
}

size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n) {
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (unsigned char)*a < (unsigned char)*b ? -1 : 1;
        if (!*a)
            return 0;
    }
    return 0;
}

/* ---- command line ---- */
int bh_cmdline_get(const char *cmdline, const char *key, char *out, size_t outlen) {
    size_t klen = strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - word) > klen && strncmp(word, key, klen) == 0 && word[klen] == '=') {
            const char *v = word + klen + 1;
            size_t n = 0;
            while (v + n < p && n + 1 < outlen) {
                out[n] = v[n];
                n++;
            }
            if (outlen)
                out[n] = 0;
            return 1;
        }
    }
    return 0;
}

int bh_parse_u64(const char *s, uint64_t *out) {
    uint64_t v = 0;
    unsigned base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (!*s)
        return 0;
    for (; *s; s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9')
            d = (unsigned)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (unsigned)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (unsigned)(*s - 'A' + 10);
        else
            return 0;
        v = v * base + d;
    }
    *out = v;
    return 1;
}

const char *bh_protocol_name(int protocol) {
    switch (protocol) {
    case BH_BOOT_LINUX64:
        return "linux64";
    case BH_BOOT_LINUX32:
        return "linux32";
    case BH_BOOT_PVH:
        return "pvh";
    }
    return "unknown";
}

/* ---- time ---- */
void bh_udelay(uint64_t us) {
    uint64_t start = rdtsc();
    while (rdtsc() - start < us * 4000)
        cpu_relax();
}

uint32_t bh_apic_id(void) {
    uint32_t r[4];
    cpuid(1, 0, r);
    return r[1] >> 24;
}

/* ---- C entry from entry.S ---- */
__attribute__((noreturn)) void bh_start(int protocol, uint64_t info);
void bh_start(int protocol, uint64_t info) {
    bh_parse_bootinfo(protocol, info, &boot_info);
    bh_exit((uint32_t)main(&boot_info));
}
