/* Red team: what a guest learns about the host through CPUID.
 *
 * Output (one fact per line):
 *   VENDOR <12 chars>            leaf 0
 *   BRAND <text>                 leaves 0x80000002-4 (non-printable bytes as '?')
 *   LEAF1 eax=.. ebx=.. ecx=.. edx=.. hypervisor=<0|1> vmx=<0|1>
 *   HVSIG <12 chars> max=0x..    leaf 0x40000000
 *   ADDR phys=<bits> virt=<bits> leaf 0x80000008
 *   EXT1 ecx=.. svm=<0|1>        leaf 0x80000001
 *   LEAF7 ebx=.. ecx=.. sgx=<0|1> pt=<0|1>
 *   RAW <leaf> eax=.. ebx=.. ecx=.. edx=..   for leaves 0x3 0x6 0xa 0x12 0x14 0x16
 *   PASS
 */
#include "guest.h"

int bh_want_mptable = 0;

static void put12(const char *tag, uint32_t a, uint32_t b, uint32_t c, const char *suffix) {
    char s[13];
    uint32_t w[3] = {a, b, c};
    memcpy(s, w, 12);
    s[12] = 0;
    for (int i = 0; i < 12; i++)
        if (s[i] < 0x20 || s[i] > 0x7e)
            s[i] = '?';
    printf("%s %s%s\n", tag, s, suffix);
}

int main(const struct bh_bootinfo *bi) {
    (void)bi;
    uint32_t r[4];
    cpuid(0, 0, r);
    uint32_t max = r[0];
    put12("VENDOR", r[1], r[3], r[2], "");

    cpuid(0x80000000U, 0, r);
    uint32_t max_ext = r[0];
    char brand[49];
    memset(brand, 0, sizeof(brand));
    if (max_ext >= 0x80000004U) {
        for (uint32_t i = 0; i < 3; i++) {
            cpuid(0x80000002U + i, 0, r);
            memcpy(brand + 16 * i, r, 16);
        }
    }
    for (int i = 0; i < 48 && brand[i]; i++)
        if (brand[i] < 0x20 || brand[i] > 0x7e)
            brand[i] = '?';
    printf("BRAND %s\n", brand);

    cpuid(1, 0, r);
    printf("LEAF1 eax=0x%x ebx=0x%x ecx=0x%x edx=0x%x hypervisor=%u vmx=%u\n", r[0], r[1], r[2], r[3],
           (r[2] >> 31) & 1, (r[2] >> 5) & 1);

    cpuid(0x40000000U, 0, r);
    char suffix[32];
    uint32_t hvmax = r[0];
    suffix[0] = 0;
    put12("HVSIG", r[1], r[2], r[3], "");
    printf("HVMAX 0x%x\n", hvmax);

    if (max_ext >= 0x80000008U) {
        cpuid(0x80000008U, 0, r);
        printf("ADDR phys=%u virt=%u\n", r[0] & 0xff, (r[0] >> 8) & 0xff);
    } else {
        printf("ADDR none\n");
    }
    if (max_ext >= 0x80000001U) {
        cpuid(0x80000001U, 0, r);
        printf("EXT1 ecx=0x%x svm=%u\n", r[2], (r[2] >> 2) & 1);
    }
    if (max >= 7) {
        cpuid(7, 0, r);
        printf("LEAF7 ebx=0x%x ecx=0x%x sgx=%u pt=%u\n", r[1], r[2], (r[1] >> 2) & 1, (r[1] >> 25) & 1);
    }
    static const uint32_t raw[] = {0x3, 0x6, 0xa, 0x12, 0x14, 0x16};
    for (unsigned i = 0; i < sizeof(raw) / sizeof(raw[0]); i++) {
        if (raw[i] > max) {
            printf("RAW 0x%x absent\n", raw[i]);
            continue;
        }
        cpuid(raw[i], 0, r);
        printf("RAW 0x%x eax=0x%x ebx=0x%x ecx=0x%x edx=0x%x\n", raw[i], r[0], r[1], r[2], r[3]);
    }
    printf("PASS\n");
    return 0;
}
