/* Start-to-exit benchmark: print one line, exit with debug-exit code 0. */
#include "guest.h"

int bh_want_mptable = 0; /* keep ring-0 start-up work minimal */

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    printf("HELLO bulkhead\n");
    return 0;
}
