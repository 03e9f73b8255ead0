/* Boot information parsing: Linux boot_params, PVH hvm_start_info, Intel MP table.
 * Everything read here was written by the VMM and is treated as untrusted: counts are clamped,
 * addresses must lie below 4 GiB (the identity map), and the MP table checksums are verified. */
#include "guest.h"

#define LIMIT_4G 0x100000000ULL
#define PVH_MAGIC 0x336ec578U

static uint8_t rd8(uint64_t a) { return *(volatile uint8_t *)a; }
static uint16_t rd16(uint64_t a) { return *(volatile uint16_t *)a; }
static uint32_t rd32(uint64_t a) { return *(volatile uint32_t *)a; }
static uint64_t rd64(uint64_t a) { return *(volatile uint64_t *)a; }

static int below_4g(uint64_t addr, uint64_t len) { return addr < LIMIT_4G && len <= LIMIT_4G - addr; }

static void copy_cmdline(struct bh_bootinfo *bi, uint64_t addr) {
    bi->cmdline_addr = addr;
    bi->cmdline[0] = 0;
    if (addr == 0 || !below_4g(addr, BH_CMDLINE_MAX))
        return;
    unsigned i = 0;
    for (; i + 1 < BH_CMDLINE_MAX; i++) {
        char c = (char)rd8(addr + i);
        if (!c)
            break;
        bi->cmdline[i] = c;
    }
    bi->cmdline[i] = 0;
}

static void parse_boot_params(struct bh_bootinfo *bi, uint64_t bp) {
    if (!below_4g(bp, 4096))
        return;
    bi->info_valid = 1;
    uint64_t cmd = rd32(bp + 0x228) | ((uint64_t)rd32(bp + 0x0c8) << 32);
    copy_cmdline(bi, cmd);
    unsigned n = rd8(bp + 0x1e8);
    if (n > BH_E820_MAX)
        n = BH_E820_MAX;
    for (unsigned i = 0; i < n; i++) {
        uint64_t e = bp + 0x2d0 + 20 * i;
        bi->e820[i].addr = rd64(e);
        bi->e820[i].size = rd64(e + 8);
        bi->e820[i].type = rd32(e + 16);
    }
    bi->n_e820 = n;
}

static void parse_pvh(struct bh_bootinfo *bi, uint64_t si) {
    if (!below_4g(si, 56) || rd32(si) != PVH_MAGIC)
        return;
    bi->info_valid = 1;
    copy_cmdline(bi, rd64(si + 24));
    if (rd32(si + 4) < 1) /* memmap fields exist from version 1 */
        return;
    uint64_t map = rd64(si + 40);
    unsigned n = rd32(si + 48);
    if (n > BH_E820_MAX)
        n = BH_E820_MAX;
    if (!map || !below_4g(map, (uint64_t)n * 24))
        return;
    for (unsigned i = 0; i < n; i++) {
        uint64_t e = map + 24 * (uint64_t)i;
        bi->e820[i].addr = rd64(e);
        bi->e820[i].size = rd64(e + 8);
        bi->e820[i].type = rd32(e + 16);
    }
    bi->n_e820 = n;
}

static int checksum_ok(uint64_t a, uint64_t len) {
    uint8_t sum = 0;
    for (uint64_t i = 0; i < len; i++)
        sum = (uint8_t)(sum + rd8(a + i));
    return sum == 0;
}

static uint64_t mp_scan(uint64_t start, uint64_t len) {
    for (uint64_t a = start; a + 16 <= start + len; a += 16)
        if (rd32(a) == 0x5f504d5fU /* "_MP_" */ && rd8(a + 8) == 1 && checksum_ok(a, 16))
            return a;
    return 0;
}

static void parse_mptable(struct bh_bootinfo *bi) {
    uint64_t ebda = (uint64_t)rd16(0x40e) << 4;
    uint64_t fp = 0;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        fp = mp_scan(ebda, 1024);
    if (!fp)
        fp = mp_scan(0x9fc00, 1024);
    if (!fp)
        fp = mp_scan(0xf0000, 0x10000);
    if (!fp)
        return;
    bi->mp_addr = fp;
    uint64_t ct = rd32(fp + 4);
    if (!ct || !below_4g(ct, 44) || rd32(ct) != 0x504d4350U /* "PCMP" */)
        return;
    uint64_t len = rd16(ct + 4);
    if (len < 44 || !below_4g(ct, len) || !checksum_ok(ct, len))
        return;
    /* The entry count bounds the walk; qboot (QEMU microvm's firmware) leaves it 0, so 0 means
     * "walk the whole base table". The base table length bounds the walk in every case. */
    unsigned count = rd16(ct + 34);
    uint64_t p = ct + 44, end = ct + len;
    for (unsigned i = 0; (count == 0 || i < count) && p < end; i++) {
        uint8_t type = rd8(p);
        if (type == 0) { /* processor, 20 bytes */
            if (p + 20 > end)
                break;
            uint8_t flags = rd8(p + 3);
            if ((flags & 1) && bi->ncpus < BH_MAX_CPUS) {
                if (flags & 2)
                    bi->bsp_index = (int)bi->ncpus;
                bi->apic_ids[bi->ncpus++] = rd8(p + 1);
            }
            p += 20;
        } else if (type <= 4) {
            p += 8;
        } else {
            break; /* unknown entry type: its length is unknown, stop */
        }
    }
}

/* A payload that does not need the CPU list defines `int bh_want_mptable = 0;` to skip the scan
 * (up to ~50 ms of emulated ring-0 time when no table sits in the EBDA or at 0x9fc00). */
__attribute__((weak)) int bh_want_mptable = 1;

void bh_parse_bootinfo(int protocol, uint64_t info, struct bh_bootinfo *bi);
void bh_parse_bootinfo(int protocol, uint64_t info, struct bh_bootinfo *bi) {
    bi->protocol = protocol;
    bi->info_addr = info;
    bi->bsp_index = -1;
    if (protocol == BH_BOOT_PVH)
        parse_pvh(bi, info);
    else
        parse_boot_params(bi, info);
    if (bh_want_mptable)
        parse_mptable(bi);
}
