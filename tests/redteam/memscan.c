/* Red team, cross-VM probe, VM B: search all of this VM's RAM and its first virtio-blk disk for a
 * secret another VM holds.
 *
 * Command line: `secret=<64-bit number>`; the disk is the first virtio-blk device (optional).
 * RAM: every e820 usable (type 1) entry below 4 GiB, scanned for the 8-byte value at 8-byte
 * alignment with repne scasq; the 8 bytes holding the secret in this program's own memory (the
 * parsed command line and the local variable) are excluded by clearing them before the scan and
 * searching for the value computed as (secret ^ K) ^ K at scan time only in a register.
 * Disk: every sector, 64 KiB per request, scanned at 8-byte alignment (repne scasq) like RAM: memory
 * leaking into a disk would arrive in whole pages or sectors.
 * `plant=1` (positive control): first store the secret at 24 MiB in this VM's own RAM.
 * Output: `SCAN ram_bytes=<n> disk_bytes=<n>`, then `FOUND <where> 0x<addr>` or `NOTFOUND`, PASS.
 */
#include "virtio.h"

int bh_want_mptable = 0;

#define K 0x9e3779b97f4a7c15UL
#define CHUNK (64 * 1024)

static struct vio_dev devs[VIO_MAX_DEVS];
static struct vio_queue q;
static volatile uint64_t masked; /* secret ^ K: the plain secret is never stored in memory */

struct blk_req {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
} __attribute__((packed));

/* One virtio-blk IN request of `bytes` at `sector` into data; 0 on success. */
static int blk_read(uint64_t sector, uint64_t data, uint32_t bytes, struct blk_req *hdr, uint8_t *status) {
    hdr->type = 0;
    hdr->reserved = 0;
    hdr->sector = sector;
    *status = 0xff;
    struct vio_buf bufs[3] = {{(uint64_t)hdr, 16, 0}, {data, bytes, 1}, {(uint64_t)status, 1, 1}};
    uint32_t len;
    if (vio_xfer(&q, bufs, 3, 2000000, &len) != VIO_DONE)
        return -1;
    return *status == 0 ? 0 : -1;
}

static uint64_t scan_ram(uint64_t start, uint64_t end, uint64_t *hit) {
    start = (start + 7) & ~7UL;
    end &= ~7UL;
    if (end <= start)
        return 0;
    uint64_t *p = (uint64_t *)start;
    uint64_t n = (end - start) / 8;
    while (n) {
        uint64_t v = masked ^ K; /* in a register only */
        __asm__ volatile("repne scasq" : "+D"(p), "+c"(n) : "a"(v) : "memory", "cc");
        if (p[-1] == v) {
            *hit = (uint64_t)(p - 1);
            return end - start;
        }
    }
    return end - start;
}

int main(const struct bh_bootinfo *bi) {
    char buf[32];
    uint64_t secret = 0;
    if (!bh_cmdline_get(bi->cmdline, "secret", buf, sizeof(buf)) || !bh_parse_u64(buf, &secret)) {
        printf("FAIL no secret= on the command line\n");
        return 1;
    }
    masked = secret ^ K;
    secret = 0;
    memset(buf, 0, sizeof(buf));
    /* The boot info copy of the command line holds the secret as text, not as the 8-byte value: the
     * binary scan cannot match it. The original command line in guest RAM is text too. */
    vio_arena_init(bi);
    if (vio_cmdline_u64(bi, "plant", 0))
        *(volatile uint64_t *)0x1800000UL = masked ^ K;
    uint64_t ram = 0, disk = 0, hit = 0;
    const char *where = 0;
    for (unsigned i = 0; i < bi->n_e820 && !hit; i++) {
        const struct bh_e820 *e = &bi->e820[i];
        if (e->type != 1 || e->addr >= 0x100000000UL)
            continue;
        uint64_t end = e->addr + e->size;
        if (end > 0x100000000UL)
            end = 0x100000000UL;
        uint64_t start = e->addr < 0x1000 ? 0x1000 : e->addr; /* page 0: our null page */
        ram += scan_ram(start, end, &hit);
        if (hit)
            where = "ram";
    }
    int count = vio_find(bi->cmdline, devs, VIO_MAX_DEVS);
    struct vio_dev *d = vio_nth(devs, count, VIRTIO_ID_BLOCK, 0);
    if (!hit && d) {
        if (vio_init(d, 0) != 0 || vio_queue_setup(d, &q, 0, 8) != 0) {
            printf("FAIL blk setup status=0x%x\n", vio_status(d));
            return 1;
        }
        vio_driver_ok(d);
        uint64_t sectors = vio_cfg64(d, 0);
        uint64_t data = vio_alloc(CHUNK, 4096);
        struct blk_req *hdr = (struct blk_req *)vio_alloc(sizeof(*hdr), 16);
        uint8_t *status = (uint8_t *)vio_alloc(1, 1);
        for (uint64_t s = 0; s < sectors && !hit; s += CHUNK / 512) {
            uint64_t n = sectors - s < CHUNK / 512 ? sectors - s : CHUNK / 512;
            if (blk_read(s, data, (uint32_t)(n * 512), hdr, status) != 0) {
                printf("FAIL disk read sector=%lu status=%u\n", s, *status);
                return 1;
            }
            uint64_t h = 0;
            scan_ram(data, data + n * 512, &h);
            if (h) {
                hit = s * 512 + (h - data);
                where = "disk";
            }
            disk += n * 512;
        }
    }
    printf("SCAN ram_bytes=%lu disk_bytes=%lu\n", ram, disk);
    if (where)
        printf("FOUND %s 0x%lx\n", where, hit);
    else
        printf("NOTFOUND\n");
    printf("PASS\n");
    return 0;
}
