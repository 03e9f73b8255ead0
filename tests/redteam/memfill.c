/* Red team, cross-VM probe, VM A: fill guest RAM with a secret.
 *
 * Command line: `secret=<64-bit number>` (required), `mib=<n>` (default 16): fill n MiB starting at
 * 16 MiB with the 8-byte little-endian secret (rep stosq), `exit=1`: exit (code 0) after DONE
 * instead of waiting. Output: `DONE secret=0x<secret> base=0x<addr> bytes=<n>`, then waits in
 * `sti; hlt` (an IDT whose every gate is a bare iretq, so a stray interrupt changes nothing) until
 * the host stops it; with interrupts off the VMM would end it as halted.
 */
#include "guest.h"

int bh_want_mptable = 0;

#define FILL_BASE 0x1000000UL

__asm__(".text\n.global idle_isr\nidle_isr:\n  iretq\n");
extern char idle_isr[];

struct __attribute__((packed)) gate {
    uint16_t off0, sel;
    uint8_t ist, type;
    uint16_t off1;
    uint32_t off2, zero;
};
static struct gate idt[256] __attribute__((aligned(16)));

static void idle_forever(void) {
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    uint64_t h = (uint64_t)idle_isr;
    for (int v = 32; v < 256; v++) /* external interrupts only: exceptions still triple-fault */
        idt[v] = (struct gate){(uint16_t)h, cs, 0, 0x8e, (uint16_t)(h >> 16), (uint32_t)(h >> 32), 0};
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } idtr = {sizeof(idt) - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr) : "memory");
    for (;;)
        __asm__ volatile("sti; hlt" ::: "memory");
}

int main(const struct bh_bootinfo *bi) {
    char buf[32];
    uint64_t secret = 0, mib = 16, ex = 0;
    if (!bh_cmdline_get(bi->cmdline, "secret", buf, sizeof(buf)) || !bh_parse_u64(buf, &secret)) {
        printf("FAIL no secret= on the command line\n");
        return 1;
    }
    if (bh_cmdline_get(bi->cmdline, "mib", buf, sizeof(buf)))
        bh_parse_u64(buf, &mib);
    if (bh_cmdline_get(bi->cmdline, "exit", buf, sizeof(buf)))
        bh_parse_u64(buf, &ex);
    uint64_t count = (mib << 20) / 8;
    void *dst = (void *)FILL_BASE;
    __asm__ volatile("rep stosq" : "+D"(dst), "+c"(count) : "a"(secret) : "memory");
    printf("DONE secret=0x%lx base=0x%lx bytes=%lu\n", secret, FILL_BASE, mib << 20);
    if (ex)
        return 0;
    idle_forever();
}
