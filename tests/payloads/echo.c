/* Reads one line from COM1 (polling LSR.DR) and prints it back as `ECHO <line>`: host input reaches the
 * guest. Gives up after a bounded wait and prints `ECHO_TIMEOUT`. */
#include "guest.h"

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    char line[128];
    unsigned n = 0;
    printf("READY\n");
    for (uint64_t spins = 0; n < sizeof line - 1 && spins < 300000ULL; spins++) {
        if (!(inb(BH_COM1 + 5) & 1))
            continue;
        char c = (char)inb(BH_COM1);
        if (c == '\n' || c == '\r')
            break;
        line[n++] = c;
    }
    line[n] = 0;
    if (n == 0) {
        printf("ECHO_TIMEOUT\n");
        return 1;
    }
    printf("ECHO %s\n", line);
    return 0;
}
