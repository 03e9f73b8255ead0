/* The interactive console guest (tests/test_console_*.py): prints `CONSOLE READY`, then echoes every
 * byte it reads from COM1 (polling LSR.DR) and, at the end of a line, prints `GOT <line>`. It also polls
 * for the two ways `vm shutdown` asks a guest to power off:
 *   - the ACPI power button: the GED event selector (devices/ged.py, MMIO 0xfea00000, read-and-clear)
 *     has the power-down bit (1 << 1) set; prints `POWER BUTTON`;
 *   - Ctrl-Alt-Del: the i8042 output buffer delivers the scan code set 2 make codes 0x14 0x11 0xe0 0x71
 *     (devices/i8042.py); prints `CTRL-ALT-DEL`.
 * Either makes it print `POWER OFF` and exit through the debug-exit port (status 0), unless its command
 * line says `shutdown=ignore` (a guest that does not handle it: `vm shutdown` must force-stop it after
 * the timeout; it then prints `... ignored`). Runs until stopped. */
#include "guest.h"

#define GED_ESEL 0xfea00000UL
#define GED_PWR_DOWN 0x2u

static void asked(const char *how, int ignore) {
    printf("%s%s\n", how, ignore ? " ignored" : "");
    if (!ignore) {
        printf("POWER OFF\n");
        bh_exit(0);
    }
}

int main(const struct bh_bootinfo *bi) {
    char opt[16];
    int ignore = bh_cmdline_get(bi->cmdline, "shutdown", opt, sizeof opt) && opt[0] == 'i';
    char line[128];
    unsigned n = 0;
    uint32_t scan = 0;
    printf("CONSOLE READY%s\n", ignore ? " (ignoring shutdown requests)" : "");
    for (unsigned spins = 0;; spins++) {
        if (inb(BH_COM1 + 5) & 1) {
            char c = (char)inb(BH_COM1);
            if (c == '\r' || c == '\n') {
                line[n] = 0;
                printf("\nGOT %s\n", line);
                n = 0;
            } else {
                serial_putc(c);
                if (n < sizeof line - 1)
                    line[n++] = c;
            }
            continue;
        }
        if (inb(0x64) & 1) {
            scan = (scan << 8) | inb(0x60);
            if (scan == 0x1411e071u) {
                scan = 0;
                asked("CTRL-ALT-DEL", ignore);
            }
            continue;
        }
        if ((spins & 15) == 0 && (mmio_read32(GED_ESEL) & GED_PWR_DOWN))
            asked("POWER BUTTON", ignore);
        bh_udelay(500);
    }
}
