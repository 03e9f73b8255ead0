/*
 * Block throughput on the first virtio-blk device (whole image, one request in flight):
 *   seq_write  1 MiB OUT requests over the whole image (`seq_kib=N` changes the size)
 *   flush      one FLUSH
 *   seq_read   1 MiB IN requests over the whole image
 *   rand_read  `rand_count=N` (default 1000) 4 KiB IN requests at random 4 KiB-aligned offsets
 *   rand_write the same count of 4 KiB OUT requests
 * `phases=a,b,...` selects phases (default all, in this order), `seed=N` the offsets, `ack=0` skips
 * the InterruptStatus/InterruptAck exchange after each completion.
 *
 * Output (lines; the host timestamps each line as it arrives on the serial port):
 *   BENCH capacity=<sectors> seq_bytes=<n> rand_count=<n> ack=<0|1>
 *   TSC hz=<n>|unknown source=<cpuid15|cpuid16|none>
 *   PHASE <name> start
 *   PHASE <name> end bytes=<n> requests=<n> errors=<n> tsc=<cycles>
 *   PASS (no request failed) or FAIL <why>
 */
#include "virtio.h" /* built with -I tests/payloads (see tests/virtio_payloads.py) */

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_F_BLK_SIZE 6
#define BLK_F_FLUSH 9
#define TIMEOUT_US 30000000

struct blk_req {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
} __attribute__((packed));

static struct vio_dev devs[VIO_MAX_DEVS];
static struct vio_queue q;
static struct blk_req *hdr;
static volatile uint8_t *st;

static int request(uint32_t type, uint64_t sector, uint64_t buf, uint32_t len) {
    struct vio_buf b[3];
    int n = 0;
    hdr->type = type;
    hdr->sector = sector;
    *st = 0xee;
    b[n++] = (struct vio_buf){(uint64_t)(uintptr_t)hdr, sizeof(*hdr), 0};
    if (len)
        b[n++] = (struct vio_buf){buf, len, type == BLK_T_IN};
    b[n++] = (struct vio_buf){(uint64_t)(uintptr_t)st, 1, 1};
    if (vio_xfer(&q, b, n, TIMEOUT_US, 0) != VIO_DONE)
        return -1;
    return *st;
}

static void tsc_hz(void) {
    uint32_t r[4];
    cpuid(0, 0, r);
    uint32_t max = r[0];
    if (max >= 0x15) {
        cpuid(0x15, 0, r);
        if (r[0] && r[1] && r[2]) {
            printf("TSC hz=%lu source=cpuid15\n", (uint64_t)r[2] * r[1] / r[0]);
            return;
        }
    }
    if (max >= 0x16) {
        cpuid(0x16, 0, r);
        if (r[0] & 0xffff) {
            printf("TSC hz=%lu source=cpuid16\n", (uint64_t)(r[0] & 0xffff) * 1000000);
            return;
        }
    }
    printf("TSC hz=unknown source=none\n");
}

static int wanted(const char *list, const char *name) {
    if (!list[0])
        return 1;
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = p;
        while (*e && *e != ',')
            e++;
        if ((size_t)(e - p) == n && strncmp(p, name, n) == 0)
            return 1;
        p = *e ? e + 1 : e;
    }
    return 0;
}

static uint64_t t0, bytes, reqs, errors;

static void start(const char *name) {
    printf("PHASE %s start\n", name);
    bytes = reqs = errors = 0;
    t0 = rdtsc();
}

static void end(const char *name) {
    uint64_t cycles = rdtsc() - t0;
    printf("PHASE %s end bytes=%lu requests=%lu errors=%lu tsc=%lu\n", name, bytes, reqs, errors, cycles);
}

static void account(int st_, uint32_t len) {
    reqs++;
    if (st_ == 0)
        bytes += len;
    else
        errors++;
}

int main(const struct bh_bootinfo *bi) {
    vio_arena_init(bi);
    uint64_t seed = vio_cmdline_u64(bi, "seed", 1);
    uint64_t count = vio_cmdline_u64(bi, "rand_count", 1000);
    uint64_t seq = vio_cmdline_u64(bi, "seq_kib", 1024) * 1024;
    vio_no_ack = vio_cmdline_u64(bi, "ack", 1) == 0;
    char phases[128] = "";
    bh_cmdline_get(bi->cmdline, "phases", phases, sizeof(phases));
    if (seq < 4096 || seq > (16ULL << 20) || seq % 512)
        seq = 1 << 20;
    int n = vio_find(bi->cmdline, devs, VIO_MAX_DEVS);
    struct vio_dev *d = vio_nth(devs, n, VIRTIO_ID_BLOCK, 0);
    hdr = (struct blk_req *)vio_alloc(sizeof(*hdr), 16);
    st = (volatile uint8_t *)vio_alloc(1, 1);
    uint64_t buf = vio_alloc(seq, 4096);
    if (!d || !buf) {
        printf("FAIL no virtio-blk device or no memory for a %lu-byte buffer\n", seq);
        return 1;
    }
    if (vio_init(d, 1ULL << BLK_F_BLK_SIZE | 1ULL << BLK_F_FLUSH) != 0 || vio_queue_setup(d, &q, 0, 16) != 0) {
        printf("FAIL setup status=0x%x\n", vio_status(d));
        return 1;
    }
    vio_driver_ok(d);
    hdr->reserved = 0;
    uint64_t cap = vio_cfg64(d, 0);
    uint64_t seq_sectors = seq / 512;
    uint64_t blocks4k = cap / 8;
    printf("BENCH capacity=%lu seq_bytes=%lu rand_count=%lu ack=%d\n", cap, seq, count, !vio_no_ack);
    tsc_hz();
    if (blocks4k == 0) {
        printf("FAIL image smaller than 4 KiB\n");
        return 1;
    }
    uint64_t total_errors = 0;
    if (wanted(phases, "seq_write")) {
        start("seq_write");
        for (uint64_t s = 0; s < cap; s += seq_sectors) {
            uint64_t n_sec = cap - s < seq_sectors ? cap - s : seq_sectors;
            account(request(BLK_T_OUT, s, buf, (uint32_t)(n_sec * 512)), (uint32_t)(n_sec * 512));
        }
        end("seq_write");
        total_errors += errors;
    }
    if (wanted(phases, "flush")) {
        start("flush");
        account(request(BLK_T_FLUSH, 0, 0, 0), 0);
        end("flush");
        total_errors += errors;
    }
    if (wanted(phases, "seq_read")) {
        start("seq_read");
        for (uint64_t s = 0; s < cap; s += seq_sectors) {
            uint64_t n_sec = cap - s < seq_sectors ? cap - s : seq_sectors;
            account(request(BLK_T_IN, s, buf, (uint32_t)(n_sec * 512)), (uint32_t)(n_sec * 512));
        }
        end("seq_read");
        total_errors += errors;
    }
    uint64_t rng = seed * 0x9E3779B97F4A7C15ULL | 1;
    if (wanted(phases, "rand_read")) {
        start("rand_read");
        for (uint64_t i = 0; i < count; i++)
            account(request(BLK_T_IN, (vio_rand(&rng) % blocks4k) * 8, buf, 4096), 4096);
        end("rand_read");
        total_errors += errors;
    }
    if (wanted(phases, "rand_write")) {
        start("rand_write");
        for (uint64_t i = 0; i < count; i++)
            account(request(BLK_T_OUT, (vio_rand(&rng) % blocks4k) * 8, buf, 4096), 4096);
        end("rand_write");
        total_errors += errors;
    }
    if (total_errors) {
        printf("FAIL %lu requests failed\n", total_errors);
        return 1;
    }
    printf("PASS\n");
    return 0;
}
