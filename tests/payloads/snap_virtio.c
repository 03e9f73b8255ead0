/*
 * Snapshot test guest with virtio devices: streams virtio-blk writes and reads and virtio-rng requests
 * and prints, so that a run interrupted (bulkhead run --snapshot-on-exit) and restored must print
 * exactly what an uninterrupted run prints, and leave the same disk.
 * Needs one writable virtio-blk drive of at least 64 KiB and one virtio-rng device.
 * Step n (0..count-1) does `rounds` rounds of: write 8 sectors of vio_pattern(seed n*16+r) at slot
 * (n*rounds+r) % 16 (data split over two descriptors), read them back (one descriptor) and compare,
 * then a 64-byte rng request (only its length is printed: the bytes are fresh host entropy).
 * It folds what it read into an FNV-1a sum, prints "STEP n sum=.. rng=..", then waits ~delay TSC
 * cycles. At the end it reads the 16 slots back, prints "DONE sum=.." and exits 0 (debug-exit 1).
 * With net=1 (and a virtio-net NIC) each round also sends one Ethernet frame (broadcast, ethertype
 * 0x88b5, payload "snap <step> <round>"), so the host can check that every frame left exactly once.
 * Command line: count=N (default 20), rounds=R (default 4), delay=CYCLES (default 2000000), net=0|1.
 */
#include "virtio.h"

#define SLOT_SECTORS 8
#define SLOTS 16
#define TIMEOUT_US 20000000

static struct vio_dev devs[VIO_MAX_DEVS];
static struct vio_queue bq, rq, nrx, ntx;
static struct vio_blk_req *hdr;
static volatile uint8_t *status;
static uint64_t sum = 1469598103934665603ull;

static void fold(const uint8_t *p, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) {
        sum ^= p[i];
        sum *= 1099511628211ull;
    }
}

static int blk(uint32_t type, uint64_t sector, uint64_t buf, uint32_t len, int nseg) {
    struct vio_buf b[4];
    int n = 0, dev_writes = type == VIO_BLK_T_IN;
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
    *status = 0xee;
    b[n++] = (struct vio_buf){(uint64_t)(uintptr_t)hdr, sizeof(*hdr), 0};
    if (nseg == 2) {
        b[n++] = (struct vio_buf){buf, len / 2, dev_writes};
        b[n++] = (struct vio_buf){buf + len / 2, len - len / 2, dev_writes};
    } else {
        b[n++] = (struct vio_buf){buf, len, dev_writes};
    }
    b[n++] = (struct vio_buf){(uint64_t)(uintptr_t)status, 1, 1};
    uint32_t used = 0;
    int r = vio_xfer(&bq, b, n, TIMEOUT_US, &used);
    if (r != VIO_DONE)
        return 0x100 + r;
    return *status;
}

#define NET_F_MAC 5
#define NET_HDR 12
static uint8_t *frame;

static int net_setup(struct vio_dev *nd) {
    if (vio_init(nd, 1ULL << NET_F_MAC) != 0 || vio_queue_setup(nd, &nrx, 0, 8) != 0 ||
        vio_queue_setup(nd, &ntx, 1, 8) != 0)
        return -1;
    vio_driver_ok(nd);
    frame = (uint8_t *)vio_alloc(NET_HDR + 60, 64);
    if (!frame)
        return -1;
    memset(frame, 0, NET_HDR + 60);
    memset(frame + NET_HDR, 0xff, 6);
    for (int i = 0; i < 6; i++)
        frame[NET_HDR + 6 + i] = vio_cfg8(nd, (uint32_t)i);
    frame[NET_HDR + 12] = 0x88;
    frame[NET_HDR + 13] = 0xb5;
    return 0;
}

static char *put_u64(char *p, uint64_t v) {
    char tmp[20];
    int n = 0;
    do
        tmp[n++] = (char)('0' + v % 10);
    while (v /= 10);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static int net_send(uint64_t step, uint64_t round) {
    char *p = (char *)frame + NET_HDR + 14;
    memset(p, 0, 46);
    memcpy(p, "snap ", 5);
    p = put_u64(p + 5, step);
    *p++ = ' ';
    put_u64(p, round);
    struct vio_buf b = {(uint64_t)(uintptr_t)frame, NET_HDR + 60, 0};
    uint32_t len = 0;
    return vio_xfer(&ntx, &b, 1, TIMEOUT_US, &len) == VIO_DONE ? 0 : -1;
}

int main(const struct bh_bootinfo *bi) {
    vio_arena_init(bi);
    uint64_t count = vio_cmdline_u64(bi, "count", 20);
    uint64_t rounds = vio_cmdline_u64(bi, "rounds", 4);
    uint64_t delay = vio_cmdline_u64(bi, "delay", 2000000);
    int net = (int)vio_cmdline_u64(bi, "net", 0);
    int n = vio_find(bi->cmdline, devs, VIO_MAX_DEVS);
    struct vio_dev *bd = vio_nth(devs, n, VIRTIO_ID_BLOCK, 0), *rd = vio_nth(devs, n, VIRTIO_ID_RNG, 0);
    if (!bd || !rd) {
        printf("FAIL needs a virtio-blk drive and a virtio-rng device\n");
        return 1;
    }
    if (vio_init(bd, 0) != 0 || vio_queue_setup(bd, &bq, 0, 16) != 0 || vio_init(rd, 0) != 0 ||
        vio_queue_setup(rd, &rq, 0, 8) != 0) {
        printf("FAIL setup blk=0x%x rng=0x%x\n", vio_status(bd), vio_status(rd));
        return 1;
    }
    vio_driver_ok(bd);
    vio_driver_ok(rd);
    struct vio_dev *nd = net ? vio_nth(devs, n, VIRTIO_ID_NET, 0) : 0;
    if (net && (!nd || net_setup(nd) != 0)) {
        printf("FAIL net setup\n");
        return 1;
    }
    uint64_t capacity = vio_cfg64(bd, 0);
    if (capacity < SLOTS * SLOT_SECTORS) {
        printf("FAIL drive too small (%lu sectors)\n", capacity);
        return 1;
    }
    uint32_t bytes = SLOT_SECTORS * 512;
    hdr = (struct vio_blk_req *)vio_alloc(sizeof(*hdr), 16);
    status = (volatile uint8_t *)vio_alloc(1, 1);
    uint64_t wbuf = vio_alloc(bytes, 4096), rbuf = vio_alloc(bytes, 4096), ebuf = vio_alloc(64, 64);
    if (!hdr || !status || !wbuf || !rbuf || !ebuf) {
        printf("FAIL arena\n");
        return 1;
    }
    printf("START blk=%lu sectors rng=1 net=%d\n", capacity, net);
    for (uint64_t step = 0; step < count; step++) {
        uint32_t rng_total = 0;
        for (uint64_t r = 0; r < rounds; r++) {
            uint64_t slot = (step * rounds + r) % SLOTS, seed = step * 16 + r + 1;
            vio_pattern((void *)wbuf, bytes, seed, slot * SLOT_SECTORS);
            int st = blk(VIO_BLK_T_OUT, slot * SLOT_SECTORS, wbuf, bytes, 2);
            memset((void *)rbuf, 0, bytes);
            int st2 = blk(VIO_BLK_T_IN, slot * SLOT_SECTORS, rbuf, bytes, 1);
            if (st != 0 || st2 != 0 || vio_compare((void *)wbuf, (void *)rbuf, bytes) >= 0) {
                printf("FAIL step %lu round %lu write=%d read=%d\n", step, r, st, st2);
                return 1;
            }
            fold((const uint8_t *)rbuf, bytes);
            struct vio_buf e = {ebuf, 64, 1};
            uint32_t len = 0;
            if (vio_xfer(&rq, &e, 1, TIMEOUT_US, &len) != VIO_DONE) {
                printf("FAIL step %lu rng\n", step);
                return 1;
            }
            rng_total += len;
            if (net && net_send(step, r) != 0) {
                printf("FAIL step %lu net\n", step);
                return 1;
            }
        }
        printf("STEP %lu sum=%lx rng=%u\n", step, sum, rng_total);
        uint64_t t = rdtsc();
        while (rdtsc() - t < delay)
            __asm__ volatile("pause");
    }
    for (uint64_t slot = 0; slot < SLOTS; slot++) {
        memset((void *)rbuf, 0, bytes);
        if (blk(VIO_BLK_T_IN, slot * SLOT_SECTORS, rbuf, bytes, 1) != 0) {
            printf("FAIL final read %lu\n", slot);
            return 1;
        }
        fold((const uint8_t *)rbuf, bytes);
    }
    printf("DONE sum=%lx\n", sum);
    return 0;
}
