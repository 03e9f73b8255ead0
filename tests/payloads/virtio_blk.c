/*
 * virtio-blk end to end: drive 0 (first virtio-blk on the command line) must be writable, drive 1
 * (when present) read-only. Command line: `seed=N` (pattern seed, default 1), `blk=write-flush-hang`
 * (write + flush the pattern, print FLUSHED, spin forever: the host kills the VMM and checks the file),
 * `blk=write-hang` (the same without the FLUSH, printing WRITTEN: the control for the flush test).
 * Output format: tests/payloads/README.md, section "virtio payloads".
 */
#include "virtio.h"

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2
#define BLK_F_SIZE_MAX 1
#define BLK_F_SEG_MAX 2
#define BLK_F_RO 5
#define BLK_F_BLK_SIZE 6
#define BLK_F_FLUSH 9
#define PATTERN_SECTORS 8
#define TIMEOUT_US 5000000

struct blk_req {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
} __attribute__((packed));

struct drive {
    struct vio_dev *dev;
    struct vio_queue q;
    uint64_t capacity;
    int ro;
};

static struct vio_dev devs[VIO_MAX_DEVS];
static int failures;
static struct blk_req *hdr;
static volatile uint8_t *status;

static void fail(const char *what) {
    printf("FAIL %s\n", what);
    failures++;
}

/* One request: header, data split over `nseg` descriptors (0 for none), status. Returns the status
 * byte, or 0x100 + vio_wait's result when the request did not complete. */
static int request(struct drive *d, uint32_t type, uint64_t sector, uint64_t buf, uint32_t len, int nseg) {
    struct vio_buf b[4];
    int n = 0;
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
    *status = 0xee;
    b[n++] = (struct vio_buf){(uint64_t)(uintptr_t)hdr, sizeof(*hdr), 0};
    int dev_writes = type != BLK_T_OUT;
    if (nseg == 1) {
        b[n++] = (struct vio_buf){buf, len, dev_writes};
    } else if (nseg == 2) {
        b[n++] = (struct vio_buf){buf, len / 2, dev_writes};
        b[n++] = (struct vio_buf){buf + len / 2, len - len / 2, dev_writes};
    }
    b[n++] = (struct vio_buf){(uint64_t)(uintptr_t)status, 1, 1};
    uint32_t used_len = 0;
    int r = vio_xfer(&d->q, b, n, TIMEOUT_US, &used_len);
    if (r != VIO_DONE)
        return 0x100 + r;
    return *status;
}

static int setup(struct drive *d, struct vio_dev *dev, int index) {
    d->dev = dev;
    uint64_t want = 1ULL << BLK_F_RO | 1ULL << BLK_F_BLK_SIZE | 1ULL << BLK_F_FLUSH | 1ULL << BLK_F_SEG_MAX |
                    1ULL << BLK_F_SIZE_MAX;
    if (vio_init(dev, want) != 0) {
        printf("BLK %d init_failed status=0x%x\n", index, vio_status(dev));
        return -1;
    }
    if (vio_queue_setup(dev, &d->q, 0, 16) != 0) {
        printf("BLK %d queue_setup_failed\n", index);
        return -1;
    }
    vio_driver_ok(dev);
    d->capacity = vio_cfg64(dev, 0);
    d->ro = (int)(dev->features >> BLK_F_RO & 1);
    uint32_t blk_size = dev->features >> BLK_F_BLK_SIZE & 1 ? vio_cfg32(dev, 20) : 512;
    printf("BLK %d capacity=%lu ro=%d blk_size=%u queue=%u features=0x%lx offered=0x%lx\n", index, d->capacity,
           d->ro, blk_size, d->q.size, dev->features, dev->device_features);
    return 0;
}

static void print_id(struct drive *d, int index, uint64_t buf) {
    memset((void *)buf, 0, 20);
    int st = request(d, BLK_T_GET_ID, 0, buf, 20, 1);
    char id[21];
    const char *s = (const char *)buf;
    int i = 0;
    for (; i < 20 && s[i]; i++)
        id[i] = (s[i] > ' ' && s[i] < 127) ? s[i] : '?';
    id[i] = 0;
    printf("BLK %d get_id status=%d id=%s\n", index, st, id);
}

int main(const struct bh_bootinfo *bi) {
    vio_arena_init(bi);
    uint64_t seed = vio_cmdline_u64(bi, "seed", 1);
    char mode[32] = "";
    bh_cmdline_get(bi->cmdline, "blk", mode, sizeof(mode));
    int n = vio_find(bi->cmdline, devs, VIO_MAX_DEVS);
    hdr = (struct blk_req *)vio_alloc(sizeof(*hdr), 16);
    status = (volatile uint8_t *)vio_alloc(1, 1);
    uint64_t bytes = PATTERN_SECTORS * 512;
    uint64_t wbuf = vio_alloc(bytes, 4096), rbuf = vio_alloc(bytes, 4096), sbuf = vio_alloc(4096, 4096);
    if (!hdr || !sbuf) {
        fail("arena");
        return 1;
    }
    static struct drive drives[2];
    int ndrives = 0;
    for (int i = 0; i < 2; i++) {
        struct vio_dev *dev = vio_nth(devs, n, VIRTIO_ID_BLOCK, i);
        if (!dev)
            break;
        if (setup(&drives[i], dev, i) != 0) {
            fail("setup");
            return 1;
        }
        ndrives++;
    }
    printf("BLK drives=%d\n", ndrives);
    if (ndrives == 0) {
        fail("no virtio-blk device");
        return 1;
    }
    struct drive *d0 = &drives[0];
    if (d0->ro)
        fail("drive 0 is read-only");
    if (d0->capacity < PATTERN_SECTORS + 1) {
        fail("drive 0 too small");
        return 1;
    }

    /* write the pattern (data split over two descriptors), flush, read back (one descriptor) */
    vio_pattern((void *)wbuf, bytes, seed, 0);
    int st = request(d0, BLK_T_OUT, 0, wbuf, (uint32_t)bytes, 2);
    printf("BLK 0 write sectors=0..%d seed=%lu status=%d\n", PATTERN_SECTORS - 1, seed, st);
    if (st != BLK_S_OK)
        fail("write");
    if (mode[0] && strncmp(mode, "write-hang", 11) == 0) {
        printf("WRITTEN seed=%lu sectors=%d\n", seed, PATTERN_SECTORS);
        for (;;)
            cpu_relax();
    }
    st = request(d0, BLK_T_FLUSH, 0, 0, 0, 0);
    printf("BLK 0 flush status=%d\n", st);
    if (st != BLK_S_OK)
        fail("flush");
    if (mode[0] && strncmp(mode, "write-flush-hang", 17) == 0) {
        printf("FLUSHED seed=%lu sectors=%d\n", seed, PATTERN_SECTORS);
        for (;;)
            cpu_relax();
    }
    memset((void *)rbuf, 0xa5, bytes);
    st = request(d0, BLK_T_IN, 0, rbuf, (uint32_t)bytes, 1);
    int64_t diff = vio_compare((void *)wbuf, (void *)rbuf, bytes);
    printf("BLK 0 read sectors=0..%d status=%d match=%d\n", PATTERN_SECTORS - 1, st, diff < 0);
    if (st != BLK_S_OK || diff >= 0)
        fail("readback");

    print_id(d0, 0, sbuf);

    /* the last sector is readable; at the end and across it are IOERR */
    uint64_t last = d0->capacity - 1;
    st = request(d0, BLK_T_IN, last, sbuf, 512, 1);
    printf("BLK 0 read_last sector=%lu status=%d\n", last, st);
    if (st != BLK_S_OK)
        fail("read last sector");
    st = request(d0, BLK_T_IN, d0->capacity, sbuf, 512, 1);
    printf("BLK 0 read_past_end sector=%lu status=%d\n", d0->capacity, st);
    if (st != BLK_S_IOERR)
        fail("read past end not IOERR");
    st = request(d0, BLK_T_IN, last, sbuf, 1024, 1);
    printf("BLK 0 read_across_end sector=%lu status=%d\n", last, st);
    if (st != BLK_S_IOERR)
        fail("read across end not IOERR");
    st = request(d0, BLK_T_OUT, d0->capacity, sbuf, 512, 1);
    printf("BLK 0 write_past_end sector=%lu status=%d\n", d0->capacity, st);
    if (st != BLK_S_IOERR)
        fail("write past end not IOERR");
    st = request(d0, 0x7f, 0, sbuf, 512, 1);
    printf("BLK 0 unknown_type status=%d\n", st);
    if (st != BLK_S_UNSUPP)
        fail("unknown type not UNSUPP");

    if (ndrives > 1) {
        struct drive *d1 = &drives[1];
        if (!d1->ro)
            fail("drive 1 is not read-only");
        st = request(d1, BLK_T_IN, 0, rbuf, 512, 1);
        printf("BLK 1 read sector=0 status=%d\n", st);
        if (st != BLK_S_OK)
            fail("read ro drive");
        memcpy((void *)sbuf, (void *)rbuf, 512);
        vio_pattern((void *)wbuf, 512, seed ^ 0x5a5a, 0);
        st = request(d1, BLK_T_OUT, 0, wbuf, 512, 1);
        printf("BLK 1 write_ro status=%d\n", st);
        if (st != BLK_S_IOERR)
            fail("write to read-only drive not IOERR");
        memset((void *)rbuf, 0, 512);
        st = request(d1, BLK_T_IN, 0, rbuf, 512, 1);
        diff = vio_compare((void *)sbuf, (void *)rbuf, 512);
        printf("BLK 1 unchanged status=%d match=%d\n", st, diff < 0);
        if (st != BLK_S_OK || diff >= 0)
            fail("read-only drive changed");
        print_id(d1, 1, sbuf);
    }
    printf("BLK interrupt_status_seen=0x%x\n", vio_int_seen);
    if (!(vio_int_seen & VIRTIO_INT_USED))
        fail("no used-buffer interrupt status");
    if (failures)
        return 1;
    printf("PASS\n");
    return 0;
}
