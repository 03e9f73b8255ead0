/* Exits through the debug-exit port with the code given on the command line as code=N (decimal or 0x hex). */
#include "guest.h"

int main(const struct bh_bootinfo *bi) {
    char buf[32];
    uint64_t code;
    if (!bh_cmdline_get(bi->cmdline, "code", buf, sizeof buf) || !bh_parse_u64(buf, &code)) {
        printf("FAIL no code=N on the command line\n");
        return 127;
    }
    printf("EXIT %lu\n", code);
    return (int)(uint32_t)code;
}
