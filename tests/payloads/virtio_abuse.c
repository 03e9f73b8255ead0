/*
 * virtio_abuse: a hostile driver against the first virtio-blk device (drive 0, writable scratch), or
 * with `dev=rng` / `dev=net` the first virtio-rng device / the TX queue of the first virtio-net device.
 * Each case breaks one rule of the virtio 1.2 split queue / mmio transport, observes what the device
 * did, then resets the device, brings it up again and checks that a normal read works.
 *
 * Command line: `dev=blk|rng|net` (default blk), `case=NAME[,NAME...]` (default: all cases of that
 * device, in table order), `set=own|any|all` (default own: the device's own cases; any: the driver
 * errors every device gets (queue configuration, status and queue-register order); all: both).
 * Each driver-error case also prints the Status register read back after each step.
 * One line per case:  ABUSE <name> <result> <recovered|broken> [detail...]
 *   result: needs_reset  the device set DEVICE_NEEDS_RESET (0x40) in the status register
 *           refused      a register write did not take (QueueReady/status/FEATURES_OK read back
 *                        unchanged), or out-of-range config reads gave 0 / all ones and writes did not stick
 *           ioerr        the request completed with status VIRTIO_BLK_S_IOERR or UNSUPP
 *           completed    the request completed with status OK (the device did what was asked)
 *           accepted     a malformed setup was taken as valid (no refusal, no NEEDS_RESET)
 *           ignored      nothing visible happened within the wait (no completion, no NEEDS_RESET)
 *           failed       the device set FAILED
 * Then `ABUSE_SUMMARY cases=<n> recovered=<m>` and PASS when every case recovered.
 * Output format: tests/payloads/README.md, section "virtio payloads".
 */
#include "virtio.h"

#define QSIZE 16
#define WAIT_US 500000
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_F_RO 5
#define BLK_F_BLK_SIZE 6
#define BLK_F_FLUSH 9
#define F_INDIRECT_DESC 28

struct blk_req {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
} __attribute__((packed));

static struct vio_dev devs[VIO_MAX_DEVS];
static struct vio_dev *dev;
static struct vio_queue q;
static uint64_t ring_mem; /* 3 pages: desc, avail, used (reused by every setup) */
static struct vio_queue rxq; /* net only: the RX queue, set up and left empty */
static uint64_t ring_rx;     /* net only: its rings (3 pages) */
static struct blk_req *hdr;
static volatile uint8_t *st;
static uint64_t data; /* 4 KiB */

enum { T_BLK, T_RNG, T_NET, T_ANY };
static int target;          /* dev=blk|rng|net */
static uint64_t ram_end;    /* end of the highest usable RAM range (e820) */
static uint64_t big_mem;    /* rings for a queue of twice QueueNumMax */
static uint32_t num_max;    /* QueueNumMax of the abused queue */
#define NET_F_MAC 5
#define NET_HDR 12

static const char *result_name(int r);

enum { R_NEEDS_RESET, R_REFUSED, R_IOERR, R_COMPLETED, R_ACCEPTED, R_IGNORED, R_FAILED, R_NO_STATUS, R_UNSUPPORTED };

static const char *result_name(int r) {
    static const char *const names[] = {"needs_reset", "refused", "ioerr",   "completed",  "accepted",
                                        "ignored",     "failed",  "no_status", "unsupported"};
    return r >= 0 && r <= R_UNSUPPORTED ? names[r] : "?";
}

static void clear_rings(void) { memset((void *)ring_mem, 0, 3 * 4096); }

/* Features negotiated, rings at ring_mem with QueueNum `size` (DRIVER_OK not yet written).
 * Returns QueueReady as read back. */
static int setup_queue(uint16_t size, uint64_t desc, uint64_t avail, uint64_t used) {
    uint64_t want = 1ULL << F_INDIRECT_DESC;
    if (target == T_BLK)
        want |= 1ULL << BLK_F_RO | 1ULL << BLK_F_BLK_SIZE | 1ULL << BLK_F_FLUSH;
    if (target == T_NET)
        want |= 1ULL << NET_F_MAC;
    if (vio_init(dev, want) != 0)
        return -1;
    clear_rings();
    if (target == T_NET) { /* queue 0 (RX) normally, the abused queue is TX (1) */
        memset((void *)ring_rx, 0, 3 * 4096);
        if (vio_queue_setup_raw(dev, &rxq, 0, QSIZE, ring_rx, ring_rx + 4096, ring_rx + 8192) != 1)
            return -1;
        return vio_queue_setup_raw(dev, &q, 1, size, desc, avail, used);
    }
    return vio_queue_setup_raw(dev, &q, 0, size, desc, avail, used);
}

static int bring_up(void) {
    if (setup_queue(QSIZE, ring_mem, ring_mem + 4096, ring_mem + 8192) != 1)
        return -1;
    vio_driver_ok(dev);
    return 0;
}

static int status_flags(void) {
    uint32_t s = vio_status(dev);
    if (s & VIRTIO_STATUS_NEEDS_RESET)
        return R_NEEDS_RESET;
    if (s & VIRTIO_STATUS_FAILED)
        return R_FAILED;
    return -1;
}

/* After a notify: wait for a used element or NEEDS_RESET. */
static int outcome(void) {
    uint32_t len;
    int r = vio_wait(&q, WAIT_US, 0, &len);
    int s = status_flags();
    if (s >= 0)
        return s;
    if (r == VIO_DONE && target != T_BLK)
        return R_COMPLETED;
    if (r == VIO_DONE)
        return *st == 0 ? R_COMPLETED : *st == 0xee ? R_NO_STATUS : R_IOERR;
    return R_IGNORED;
}

static void fill_hdr(uint32_t type, uint64_t sector) {
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
    *st = 0xee;
}

/* Publish a chain whose data descriptor is (addr, len, device_writes). */
static int request_with_data(uint32_t type, uint64_t addr, uint32_t len) {
    fill_hdr(type, 0);
    struct vio_buf b[3] = {
        {(uint64_t)(uintptr_t)hdr, sizeof(*hdr), 0},
        {addr, len, type == BLK_T_IN},
        {(uint64_t)(uintptr_t)st, 1, 1},
    };
    vio_submit(&q, b, 3);
    return outcome();
}

/* Write raw descriptors i..: (addr, len, flags, next) and publish head. */
static void raw_desc(uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    q.desc[i].addr = addr;
    q.desc[i].len = len;
    q.desc[i].flags = flags;
    q.desc[i].next = next;
}

static void publish(uint16_t head) {
    q.avail->ring[q.avail_idx % q.size] = head;
    __asm__ volatile("" ::: "memory");
    q.avail_idx++;
    q.avail->idx = q.avail_idx;
    __asm__ volatile("" ::: "memory");
}

/* A TX frame at data: zero virtio-net header, broadcast, ethertype 0x88b5, 60 bytes. */
static uint32_t net_frame(void) {
    uint8_t *p = (uint8_t *)data;
    memset(p, 0, NET_HDR + 60);
    memset(p + NET_HDR, 0xff, 6);
    p[NET_HDR + 6] = 0x02;
    p[NET_HDR + 12] = 0x88;
    p[NET_HDR + 13] = 0xb5;
    return NET_HDR + 60;
}

static int normal_read(void) {
    if (target == T_RNG) {
        struct vio_buf b = {data, 16, 1};
        uint32_t len = 0;
        return vio_xfer(&q, &b, 1, 2000000, &len) == VIO_DONE && len > 0 && len <= 16;
    }
    if (target == T_NET) {
        struct vio_buf b = {data, net_frame(), 0};
        return vio_xfer(&q, &b, 1, 2000000, 0) == VIO_DONE;
    }
    fill_hdr(BLK_T_IN, 0);
    struct vio_buf b[3] = {
        {(uint64_t)(uintptr_t)hdr, sizeof(*hdr), 0},
        {data, 512, 1},
        {(uint64_t)(uintptr_t)st, 1, 1},
    };
    return vio_xfer(&q, b, 3, 2000000, 0) == VIO_DONE && *st == 0;
}

/* ---- cases: each starts from a working device (DRIVER_OK) unless it sets up its own ---- */
static char detail[224];
static unsigned dlen;

static void dput(const char *t) {
    if (dlen && dlen + 1 < sizeof(detail))
        detail[dlen++] = ' ';
    while (*t && dlen + 1 < sizeof(detail))
        detail[dlen++] = *t++;
    detail[dlen] = 0;
}

/* append "key=0x<hex>" */
static void dhex(const char *key, uint64_t v) {
    static const char hx[] = "0123456789abcdef";
    char b[40];
    unsigned n = 0;
    while (*key && n < 20)
        b[n++] = *key++;
    b[n++] = '=';
    b[n++] = '0';
    b[n++] = 'x';
    int started = 0;
    for (int sh = 60; sh >= 0; sh -= 4) {
        unsigned d = (unsigned)(v >> sh) & 0xf;
        if (d || started || sh == 0)
            b[n++] = hx[d], started = 1;
    }
    b[n] = 0;
    dput(b);
}

static int c_desc_oob(void) { return request_with_data(BLK_T_IN, 0x10000000000ULL, 512); }
static int c_desc_mmio(void) { return request_with_data(BLK_T_IN, 0xc0000000ULL, 512); }
static int c_desc_self(void) { return request_with_data(BLK_T_OUT, dev->base, 512); }
static int c_huge_len(void) { return request_with_data(BLK_T_IN, data, 0xfffff000U); }

static int c_chain_loop(void) {
    fill_hdr(BLK_T_IN, 0);
    raw_desc(0, (uint64_t)(uintptr_t)hdr, sizeof(*hdr), VIRTQ_DESC_F_NEXT, 1);
    raw_desc(1, data, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    raw_desc(2, (uint64_t)(uintptr_t)st, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1); /* 2 -> 1 -> 2 ... */
    publish(0);
    vio_notify(&q);
    return outcome();
}

static int c_next_oob(void) {
    fill_hdr(BLK_T_IN, 0);
    raw_desc(0, (uint64_t)(uintptr_t)hdr, sizeof(*hdr), VIRTQ_DESC_F_NEXT, 200);
    publish(0);
    vio_notify(&q);
    return outcome();
}

static int c_head_oob(void) {
    fill_hdr(BLK_T_IN, 0);
    publish(300);
    vio_notify(&q);
    return outcome();
}

static int c_avail_jump(void) {
    fill_hdr(BLK_T_IN, 0);
    struct vio_buf b[3] = {
        {(uint64_t)(uintptr_t)hdr, sizeof(*hdr), 0},
        {data, 512, 1},
        {(uint64_t)(uintptr_t)st, 1, 1},
    };
    vio_post(&q, b, 3);
    q.avail_idx = (uint16_t)(q.avail_idx + QSIZE + 3);
    q.avail->idx = q.avail_idx; /* claims QSIZE + 4 new entries */
    vio_notify(&q);
    return outcome();
}

/* Setups that break a layout rule: refused at QueueReady, NEEDS_RESET, or accepted (then one
 * request is tried and its outcome goes to the detail). */
static int bad_setup(uint16_t size, uint64_t desc, uint64_t avail, uint64_t used, int try_request) {
    int ready = setup_queue(size, desc, avail, used);
    int s = status_flags();
    if (s >= 0)
        return s;
    if (ready != 1)
        return R_REFUSED;
    vio_driver_ok(dev);
    s = status_flags();
    if (s >= 0)
        return s;
    if (!(vio_status(dev) & VIRTIO_STATUS_DRIVER_OK))
        return R_REFUSED;
    if (!try_request)
        return R_ACCEPTED; /* the rings are not ours to write (e.g. outside the identity map) */
    fill_hdr(BLK_T_IN, 0);
    struct vio_buf b[3] = {
        {(uint64_t)(uintptr_t)hdr, sizeof(*hdr), 0},
        {data, 512, 1},
        {(uint64_t)(uintptr_t)st, 1, 1},
    };
    vio_submit(&q, b, 3);
    int r = outcome();
    if (r == R_NEEDS_RESET || r == R_FAILED)
        return r;
    char word[32] = "request=";
    const char *rn = result_name(r);
    unsigned k = 8;
    while (*rn && k + 1 < sizeof(word))
        word[k++] = *rn++;
    word[k] = 0;
    dput(word);
    return R_ACCEPTED;
}

static int c_qsize_npot(void) { return bad_setup(12, ring_mem, ring_mem + 4096, ring_mem + 8192, 1); }
static int c_qsize_too_big(void) { return bad_setup(0x8000, ring_mem, ring_mem + 4096, ring_mem + 8192, 1); }
static int c_used_overlap(void) { return bad_setup(QSIZE, ring_mem, ring_mem + 4096, ring_mem, 1); }
static int c_ring_unaligned(void) { return bad_setup(QSIZE, ring_mem + 8, ring_mem + 4096 + 1, ring_mem + 8192 + 2, 1); }
static int c_ring_oob(void) { return bad_setup(QSIZE, 0x10000000000ULL, ring_mem + 4096, ring_mem + 8192, 0); }

static int c_config_oob(void) {
    /* virtio-blk config is at most a few hundred bytes; read past the end of the 0x200 window's config */
    uint32_t a = mmio_read32(dev->base + VIRTIO_MMIO_CONFIG + 0xf0);
    uint32_t b = mmio_read32(dev->base + 0x1fc);
    uint64_t c = mmio_read64(dev->base + 0x1f8);
    mmio_write32(dev->base + 0x1fc, 0xdeadbeef);
    uint32_t b2 = mmio_read32(dev->base + 0x1fc);
    mmio_write8(dev->base + VIRTIO_MMIO_CONFIG + 0x3ff, 0x5a); /* past the window too */
    dhex("at_0x1f0", a);
    dhex("at_0x1fc", b);
    dhex("after_write", b2);
    int s = status_flags();
    if (s >= 0)
        return s;
    int blank = (a == 0 || a == 0xffffffffU) && (b == 0 || b == 0xffffffffU) && (c == 0 || c == ~0ULL);
    if (blank && b2 != 0xdeadbeef)
        return normal_read() ? R_REFUSED : R_IGNORED;
    return R_ACCEPTED;
}

static int c_notify_unset(void) {
    vio_write(dev, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    vio_write(dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0xffff);
    vio_write(dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0xffffffffU);
    bh_udelay(20000);
    int s = status_flags();
    if (s >= 0)
        return s;
    return normal_read() ? R_IGNORED : R_FAILED;
}

static int c_status_order(void) {
    vio_reset(dev);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_DRIVER_OK); /* skips ACKNOWLEDGE .. FEATURES_OK */
    uint32_t s1 = vio_status(dev);
    vio_reset(dev);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_FEATURES_OK); /* skips DRIVER */
    uint32_t s2 = vio_status(dev);
    dhex("after_driver_ok", s1);
    dhex("after_features_ok", s2);
    if (s1 & VIRTIO_STATUS_NEEDS_RESET || s2 & VIRTIO_STATUS_NEEDS_RESET)
        return R_NEEDS_RESET;
    if (!(s1 & VIRTIO_STATUS_DRIVER_OK) && !(s2 & VIRTIO_STATUS_FEATURES_OK))
        return R_REFUSED;
    return R_ACCEPTED;
}

static int c_features_no_v1(void) {
    vio_reset(dev);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, 0x80000000U); /* bit 63: never offered; no VERSION_1 */
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    uint32_t s = vio_status(dev);
    if (s & VIRTIO_STATUS_NEEDS_RESET)
        return R_NEEDS_RESET;
    return s & VIRTIO_STATUS_FEATURES_OK ? R_ACCEPTED : R_REFUSED;
}

/* ---- indirect descriptors (VIRTIO_F_INDIRECT_DESC) and request-layout abuse ---- */
static int indirect(int variant) {
    if (!(dev->features >> F_INDIRECT_DESC & 1))
        return R_UNSUPPORTED;
    volatile struct virtq_desc *t = (volatile struct virtq_desc *)(data + 2048);
    volatile struct virtq_desc *t2 = (volatile struct virtq_desc *)(data + 3072);
    fill_hdr(BLK_T_IN, 0);
    t[0].addr = (uint64_t)(uintptr_t)hdr, t[0].len = sizeof(*hdr), t[0].flags = VIRTQ_DESC_F_NEXT, t[0].next = 1;
    t[1].addr = data, t[1].len = 512, t[1].flags = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, t[1].next = 2;
    t[2].addr = (uint64_t)(uintptr_t)st, t[2].len = 1, t[2].flags = VIRTQ_DESC_F_WRITE, t[2].next = 0;
    uint32_t len = 48;
    uint16_t flags = VIRTQ_DESC_F_INDIRECT;
    if (variant == 1) { /* nested: the data descriptor is itself an indirect table */
        t2[0].addr = data, t2[0].len = 512, t2[0].flags = VIRTQ_DESC_F_WRITE, t2[0].next = 0;
        t[1].addr = (uint64_t)(uintptr_t)t2, t[1].len = 16, t[1].flags = VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT;
    } else if (variant == 2) {
        len = 40; /* not a multiple of 16 */
    } else if (variant == 3) {
        flags |= VIRTQ_DESC_F_NEXT; /* INDIRECT together with NEXT */
        raw_desc(1, (uint64_t)(uintptr_t)st, 1, VIRTQ_DESC_F_WRITE, 0);
    }
    raw_desc(0, (uint64_t)(uintptr_t)t, len, flags, 1);
    publish(0);
    vio_notify(&q);
    return outcome();
}
static int c_indirect_ok(void) { return indirect(0); }
static int c_indirect_nested(void) { return indirect(1); }
static int c_indirect_len(void) { return indirect(2); }
static int c_indirect_next(void) { return indirect(3); }

/* status descriptor not device-writable */
static int c_status_readonly(void) {
    fill_hdr(BLK_T_IN, 0);
    raw_desc(0, (uint64_t)(uintptr_t)hdr, sizeof(*hdr), VIRTQ_DESC_F_NEXT, 1);
    raw_desc(1, data, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    raw_desc(2, (uint64_t)(uintptr_t)st, 1, 0, 0);
    publish(0);
    vio_notify(&q);
    return outcome();
}

/* header marked device-writable: writable before readable breaks §2.7.4.2 */
static int c_hdr_writable(void) {
    fill_hdr(BLK_T_IN, 0);
    raw_desc(0, (uint64_t)(uintptr_t)hdr, sizeof(*hdr), VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1);
    raw_desc(1, data, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    raw_desc(2, (uint64_t)(uintptr_t)st, 1, VIRTQ_DESC_F_WRITE, 0);
    publish(0);
    vio_notify(&q);
    return outcome();
}

static int c_len_odd(void) { return request_with_data(BLK_T_IN, data, 100); }

static int c_config_write_ro(void) {
    uint64_t before = vio_cfg64(dev, 0);
    mmio_write32(dev->base + VIRTIO_MMIO_CONFIG, 0x12345678);
    mmio_write32(dev->base + VIRTIO_MMIO_CONFIG + 4, 0x1);
    uint64_t after = vio_cfg64(dev, 0);
    dhex("capacity_after", after);
    int s = status_flags();
    if (s >= 0)
        return s;
    return after == before ? R_REFUSED : R_ACCEPTED;
}

static int c_queue_sel_oob(void) {
    vio_reset(dev);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    vio_write(dev, VIRTIO_MMIO_QUEUE_SEL, 1000);
    uint32_t max = vio_read(dev, VIRTIO_MMIO_QUEUE_NUM_MAX);
    vio_write(dev, VIRTIO_MMIO_QUEUE_NUM, 16);
    vio_write(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)ring_mem);
    vio_write(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    uint32_t ready = vio_read(dev, VIRTIO_MMIO_QUEUE_READY);
    dhex("num_max", max);
    dhex("ready", ready);
    int s = status_flags();
    if (s >= 0)
        return s;
    return max == 0 && ready == 0 ? R_REFUSED : R_ACCEPTED;
}

/* move the descriptor table of a live queue to 1 TiB; a request must still use the old one */
static int c_queue_change_live(void) {
    vio_write(dev, VIRTIO_MMIO_QUEUE_SEL, 0);
    vio_write(dev, VIRTIO_MMIO_QUEUE_NUM, 4);
    vio_write(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
    vio_write(dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x100);
    int s = status_flags();
    if (s >= 0)
        return s;
    return normal_read() ? R_REFUSED : (status_flags() >= 0 ? status_flags() : R_ACCEPTED);
}

/* ---- driver errors on every device (dev=blk|rng|net): queue configuration and status ----
 * Each prints the Status register read back at each step: s_ready (after QueueReady=1), s_ok (after
 * DRIVER_OK, which a hostile driver writes regardless), s_ntf (after the notify), and isr
 * (InterruptStatus, bit 1 = configuration change). */
static int qindex(void) { return target == T_NET ? 1 : 0; }

/* A normal request for the target device, published and notified, not waited for. */
static void submit_normal(void) {
    if (target == T_RNG) {
        struct vio_buf b = {data, 16, 1};
        vio_submit(&q, &b, 1);
        return;
    }
    if (target == T_NET) {
        struct vio_buf b = {data, net_frame(), 0};
        vio_submit(&q, &b, 1);
        return;
    }
    fill_hdr(BLK_T_IN, 0);
    struct vio_buf b[3] = {
        {(uint64_t)(uintptr_t)hdr, sizeof(*hdr), 0},
        {data, 512, 1},
        {(uint64_t)(uintptr_t)st, 1, 1},
    };
    vio_submit(&q, b, 3);
}

static void dresult(const char *key, int r) {
    char word[40];
    unsigned k = 0;
    while (*key && k + 2 < sizeof(word))
        word[k++] = *key++;
    word[k++] = '=';
    for (const char *rn = result_name(r); *rn && k + 1 < sizeof(word);)
        word[k++] = *rn++;
    word[k] = 0;
    dput(word);
}

/* The queue configuration given, QueueReady, DRIVER_OK, then a request (rings the guest may write)
 * or a bare notify (rings outside RAM). */
static int cfg_case(uint16_t size, uint64_t desc, uint64_t avail, uint64_t used, int writable) {
    int ready = setup_queue(size, desc, avail, used);
    uint32_t s1 = vio_status(dev);
    vio_driver_ok(dev);
    uint32_t s2 = vio_status(dev);
    int r = R_IGNORED;
    if (writable) {
        submit_normal();
        r = outcome();
    } else {
        vio_notify(&q);
        bh_udelay(20000);
    }
    uint32_t s3 = vio_status(dev);
    uint32_t isr = vio_read(dev, VIRTIO_MMIO_INTERRUPT_STATUS);
    dhex("ready", (uint64_t)(int64_t)ready);
    dhex("s_ready", s1);
    dhex("s_ok", s2);
    dhex("s_ntf", s3);
    dhex("isr", isr);
    if ((s1 | s2 | s3) & VIRTIO_STATUS_NEEDS_RESET)
        return R_NEEDS_RESET;
    if (s3 & VIRTIO_STATUS_FAILED)
        return R_FAILED;
    if (ready != 1)
        return R_REFUSED;
    if (writable)
        dresult("request", r);
    return R_ACCEPTED;
}

#define RM ring_mem
static int g_qsize_zero(void) { return cfg_case(0, RM, RM + 4096, RM + 8192, 0); }
static int g_qsize_npot(void) { return cfg_case(12, RM, RM + 4096, RM + 8192, 1); }
static int g_qsize_over_max(void) {
    uint32_t n = num_max * 2;
    dhex("num_max", num_max);
    if (!big_mem || n > 32768)
        return R_UNSUPPORTED;
    uint64_t avail = big_mem + ((16ULL * n + 4095) & ~4095ULL);
    uint64_t used = avail + ((6 + 2ULL * n + 4095) & ~4095ULL);
    memset((void *)big_mem, 0, (size_t)(used + 6 + 8ULL * n - big_mem));
    return cfg_case((uint16_t)n, big_mem, avail, used, 1);
}
static int g_desc_unaligned(void) { return cfg_case(QSIZE, RM + 8, RM + 4096, RM + 8192, 1); }
static int g_avail_unaligned(void) { return cfg_case(QSIZE, RM, RM + 4096 + 1, RM + 8192, 1); }
static int g_used_unaligned(void) { return cfg_case(QSIZE, RM, RM + 4096, RM + 8192 + 2, 1); }
static int g_desc_in_hole(void) { return cfg_case(QSIZE, 0xc0000000ULL, RM + 4096, RM + 8192, 0); }
static int g_used_in_device(void) { return cfg_case(QSIZE, RM, RM + 4096, dev->base, 0); }
static int g_avail_past_ram(void) { return cfg_case(QSIZE, RM, ram_end - 8, RM + 8192, 0); }
static int g_desc_beyond_ram(void) { return cfg_case(QSIZE, ram_end, RM + 4096, RM + 8192, 0); }
static int g_desc_wraps(void) { return cfg_case(QSIZE, 0xffffffffffffff80ULL, RM + 4096, RM + 8192, 0); }
static int g_desc_avail_overlap(void) { return cfg_case(QSIZE, RM, RM + 16, RM + 8192, 1); }
static int g_avail_used_overlap(void) { return cfg_case(QSIZE, RM, RM + 4096, RM + 4096 + 4, 1); }
static int g_desc_used_overlap(void) { return cfg_case(QSIZE, RM, RM + 4096, RM, 1); }

/* Status after a write: the case's result is `accepted` when the out-of-order value was stored. */
static int status_case(uint32_t write, uint32_t must_have) {
    vio_write(dev, VIRTIO_MMIO_STATUS, write);
    uint32_t s = vio_status(dev);
    dhex("wrote", write);
    dhex("read", s);
    if (s & VIRTIO_STATUS_NEEDS_RESET)
        return R_NEEDS_RESET;
    return (s & must_have) == must_have && s == write ? R_ACCEPTED : R_REFUSED;
}

/* DRIVER_OK set on a running device, then ACKNOWLEDGE|DRIVER written: two bits cleared without reset. */
static int g_status_clear_bits(void) {
    return status_case(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER, VIRTIO_STATUS_DRIVER);
}

/* Features written, FEATURES_OK skipped, DRIVER_OK written. */
static int g_status_driver_ok_early(void) {
    vio_reset(dev);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    return status_case(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK,
                       VIRTIO_STATUS_DRIVER_OK);
}

/* The driver writes DEVICE_NEEDS_RESET itself (only the device sets it, §2.1.2). */
static int g_status_set_needs_reset(void) {
    uint32_t w = vio_status(dev) | VIRTIO_STATUS_NEEDS_RESET;
    vio_write(dev, VIRTIO_MMIO_STATUS, w);
    uint32_t s = vio_status(dev);
    dhex("wrote", w);
    dhex("read", s);
    return s & VIRTIO_STATUS_NEEDS_RESET ? R_ACCEPTED : R_REFUSED;
}

/* VERSION_1 plus feature bit 63, never offered, then FEATURES_OK. */
static int g_features_unoffered(void) {
    vio_reset(dev);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    vio_write(dev, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, 0x80000001U);
    return status_case(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK,
                       VIRTIO_STATUS_FEATURES_OK);
}

/* The request on q after `s_ok`: completed (the change took effect or was harmless) or not. */
static int after_change(void) {
    uint32_t s = vio_status(dev);
    dhex("s_ok", s);
    submit_normal();
    int r = outcome();
    dhex("s_ntf", vio_status(dev));
    dhex("isr", vio_read(dev, VIRTIO_MMIO_INTERRUPT_STATUS));
    return r;
}

/* DRIVER_OK with the queue not yet enabled, then the queue set up and enabled after DRIVER_OK. */
static int g_queue_after_driver_ok(void) {
    uint64_t want = target == T_NET ? 1ULL << NET_F_MAC : 0;
    if (vio_init(dev, want) != 0)
        return R_FAILED;
    if (target == T_NET && vio_queue_setup_raw(dev, &rxq, 0, QSIZE, ring_rx, ring_rx + 4096, ring_rx + 8192) != 1)
        return R_FAILED;
    vio_driver_ok(dev);
    clear_rings();
    int ready = vio_queue_setup_raw(dev, &q, (uint32_t)qindex(), QSIZE, RM, RM + 4096, RM + 8192);
    dhex("ready", (uint64_t)ready);
    int r = after_change();
    dresult("request", r);
    return r == R_NEEDS_RESET ? r : ready == 1 ? R_ACCEPTED : R_REFUSED;
}

/* QueueReady=1 written again on an enabled queue, after moving its descriptor table to 1 TiB. */
static int g_queue_ready_again(void) {
    if (setup_queue(QSIZE, RM, RM + 4096, RM + 8192) != 1)
        return R_FAILED;
    vio_write(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
    vio_write(dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x100);
    vio_write(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    dhex("s_ready", vio_status(dev));
    vio_driver_ok(dev);
    int r = after_change();
    dresult("request", r);
    /* completed: the old (valid) table stayed in use, the writes were refused */
    return r == R_NEEDS_RESET || r == R_FAILED ? r : r == R_COMPLETED ? R_REFUSED : R_ACCEPTED;
}

/* QueueNum changed from 16 to 4 while the queue is enabled (before DRIVER_OK). */
static int g_queue_resize_ready(void) {
    if (setup_queue(QSIZE, RM, RM + 4096, RM + 8192) != 1)
        return R_FAILED;
    vio_write(dev, VIRTIO_MMIO_QUEUE_NUM, 4);
    dhex("s_ready", vio_status(dev));
    vio_driver_ok(dev);
    /* slot 0 is the same for size 16 and 4: the request shows only that the device still works */
    return after_change();
}

/* QueueReady=0 written on a live queue after DRIVER_OK, then a request on it. */
static int g_queue_disable_live(void) {
    vio_write(dev, VIRTIO_MMIO_QUEUE_SEL, (uint32_t)qindex());
    vio_write(dev, VIRTIO_MMIO_QUEUE_READY, 0);
    uint32_t rd = vio_read(dev, VIRTIO_MMIO_QUEUE_READY);
    dhex("ready", rd);
    int r = after_change();
    dresult("request", r);
    return r == R_NEEDS_RESET ? r : rd == 0 ? R_ACCEPTED : R_REFUSED;
}

/* ---- virtio-rng (dev=rng) and virtio-net TX (dev=net): one-buffer requests ---- */
static int one_buf(uint64_t addr, uint32_t len, int device_writes) {
    struct vio_buf b = {addr, len, device_writes};
    vio_submit(&q, &b, 1);
    return outcome();
}

static int gen_chain_loop(void) {
    int w = target == T_RNG ? VIRTQ_DESC_F_WRITE : 0;
    if (target == T_NET)
        net_frame();
    raw_desc(0, data, NET_HDR + 30, (uint16_t)(VIRTQ_DESC_F_NEXT | w), 1);
    raw_desc(1, data + NET_HDR + 30, 30, (uint16_t)(VIRTQ_DESC_F_NEXT | w), 0);
    publish(0);
    vio_notify(&q);
    return outcome();
}

static int gen_avail_jump(void) {
    int w = target == T_RNG;
    struct vio_buf b = {data, target == T_NET ? net_frame() : 16, w};
    vio_post(&q, &b, 1);
    q.avail_idx = (uint16_t)(q.avail_idx + QSIZE + 3);
    q.avail->idx = q.avail_idx;
    vio_notify(&q);
    return outcome();
}

static int rng_desc_oob(void) { return one_buf(0x10000000000ULL, 64, 1); }
static int rng_desc_mmio(void) { return one_buf(0xc0000000ULL, 64, 1); }
static int rng_desc_readonly(void) { return one_buf(data, 64, 0); }
static int rng_huge_len(void) { return one_buf(data, 0xfffff000U, 1); }
static int net_tx_oob(void) { return one_buf(0x10000000000ULL, 72, 0); }
static int net_tx_writable(void) { return one_buf(data, net_frame(), 1); }
static int net_tx_short(void) { return one_buf(data, 4, 0); }
static int net_tx_huge(void) {
    net_frame();
    return one_buf(data, 0x20000, 0); /* 128 KiB: larger than any legal frame */
}

struct abuse_case {
    const char *name;
    int (*run)(void);
    int needs_working_device; /* bring the device up (DRIVER_OK) before the case */
    int target;               /* T_BLK (default 0), T_RNG, T_NET */
};

static const struct abuse_case cases[] = {
    {"desc_oob", c_desc_oob, 1},
    {"desc_mmio", c_desc_mmio, 1},
    {"desc_self", c_desc_self, 1},
    {"chain_loop", c_chain_loop, 1},
    {"next_oob", c_next_oob, 1},
    {"head_oob", c_head_oob, 1},
    {"huge_len", c_huge_len, 1},
    {"avail_jump", c_avail_jump, 1},
    {"qsize_npot", c_qsize_npot, 0},
    {"qsize_too_big", c_qsize_too_big, 0},
    {"used_overlap", c_used_overlap, 0},
    {"ring_unaligned", c_ring_unaligned, 0},
    {"ring_oob", c_ring_oob, 0},
    {"config_oob", c_config_oob, 1},
    {"notify_unset", c_notify_unset, 1},
    {"status_order", c_status_order, 0},
    {"features_no_v1", c_features_no_v1, 0},
    {"indirect_ok", c_indirect_ok, 1},
    {"indirect_nested", c_indirect_nested, 1},
    {"indirect_len", c_indirect_len, 1},
    {"indirect_next", c_indirect_next, 1},
    {"status_readonly", c_status_readonly, 1},
    {"hdr_writable", c_hdr_writable, 1},
    {"len_odd", c_len_odd, 1},
    {"config_write_ro", c_config_write_ro, 1},
    {"queue_sel_oob", c_queue_sel_oob, 0},
    {"queue_change_live", c_queue_change_live, 1},
    {"rng_desc_oob", rng_desc_oob, 1, T_RNG},
    {"rng_desc_mmio", rng_desc_mmio, 1, T_RNG},
    {"rng_desc_readonly", rng_desc_readonly, 1, T_RNG},
    {"rng_huge_len", rng_huge_len, 1, T_RNG},
    {"rng_chain_loop", gen_chain_loop, 1, T_RNG},
    {"rng_avail_jump", gen_avail_jump, 1, T_RNG},
    {"net_tx_oob", net_tx_oob, 1, T_NET},
    {"net_tx_writable", net_tx_writable, 1, T_NET},
    {"net_tx_short", net_tx_short, 1, T_NET},
    {"net_tx_huge", net_tx_huge, 1, T_NET},
    {"net_chain_loop", gen_chain_loop, 1, T_NET},
    {"net_avail_jump", gen_avail_jump, 1, T_NET},
    /* driver errors, on every device */
    {"qsize_zero", g_qsize_zero, 0, T_ANY},
    {"qsize_npot_any", g_qsize_npot, 0, T_ANY},
    {"qsize_over_max", g_qsize_over_max, 0, T_ANY},
    {"desc_unaligned", g_desc_unaligned, 0, T_ANY},
    {"avail_unaligned", g_avail_unaligned, 0, T_ANY},
    {"used_unaligned", g_used_unaligned, 0, T_ANY},
    {"desc_in_hole", g_desc_in_hole, 0, T_ANY},
    {"used_in_device", g_used_in_device, 0, T_ANY},
    {"avail_past_ram", g_avail_past_ram, 0, T_ANY},
    {"desc_beyond_ram", g_desc_beyond_ram, 0, T_ANY},
    {"desc_wraps", g_desc_wraps, 0, T_ANY},
    {"desc_avail_overlap", g_desc_avail_overlap, 0, T_ANY},
    {"avail_used_overlap", g_avail_used_overlap, 0, T_ANY},
    {"desc_used_overlap", g_desc_used_overlap, 0, T_ANY},
    {"status_clear_bits", g_status_clear_bits, 1, T_ANY},
    {"status_driver_ok_early", g_status_driver_ok_early, 0, T_ANY},
    {"status_set_needs_reset", g_status_set_needs_reset, 1, T_ANY},
    {"features_unoffered", g_features_unoffered, 0, T_ANY},
    {"queue_after_driver_ok", g_queue_after_driver_ok, 0, T_ANY},
    {"queue_ready_again", g_queue_ready_again, 0, T_ANY},
    {"queue_resize_ready", g_queue_resize_ready, 0, T_ANY},
    {"queue_disable_live", g_queue_disable_live, 1, T_ANY},
};
#define NCASES (int)(sizeof(cases) / sizeof(cases[0]))

static int selected(const char *list, const char *name) {
    if (!list[0] || strncmp(list, "all", 4) == 0)
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

static int known(const char *list) {
    if (!list[0] || strncmp(list, "all", 4) == 0)
        return 1;
    for (const char *p = list; *p;) {
        const char *e = p;
        while (*e && *e != ',')
            e++;
        int ok = 0;
        for (int i = 0; i < NCASES; i++)
            if (strlen(cases[i].name) == (size_t)(e - p) && strncmp(p, cases[i].name, (size_t)(e - p)) == 0)
                ok = 1;
        if (!ok)
            return 0;
        p = *e ? e + 1 : e;
    }
    return 1;
}

int main(const struct bh_bootinfo *bi) {
    vio_arena_init(bi);
    char list[512] = "";
    bh_cmdline_get(bi->cmdline, "case", list, sizeof(list));
    if (!known(list)) {
        printf("FAIL unknown case in %s\n", list);
        return 1;
    }
    char set[8] = "own"; /* own: this device's cases only; any: the driver errors run on every device */
    bh_cmdline_get(bi->cmdline, "set", set, sizeof(set));
    int own = strncmp(set, "any", 4) != 0, any = strncmp(set, "own", 4) != 0;
    char which[16] = "blk";
    bh_cmdline_get(bi->cmdline, "dev", which, sizeof(which));
    uint32_t id = VIRTIO_ID_BLOCK;
    if (strncmp(which, "rng", 4) == 0)
        target = T_RNG, id = VIRTIO_ID_RNG;
    else if (strncmp(which, "net", 4) == 0)
        target = T_NET, id = VIRTIO_ID_NET;
    else if (strncmp(which, "blk", 4) != 0) {
        printf("FAIL unknown dev=%s\n", which);
        return 1;
    }
    int n = vio_find(bi->cmdline, devs, VIO_MAX_DEVS);
    dev = vio_nth(devs, n, id, 0);
    ring_mem = vio_alloc(3 * 4096, 4096);
    ring_rx = vio_alloc(3 * 4096, 4096);
    hdr = (struct blk_req *)vio_alloc(sizeof(*hdr), 16);
    st = (volatile uint8_t *)vio_alloc(1, 1);
    data = vio_alloc(4096, 4096);
    if (!dev || !data) {
        printf("FAIL no virtio-%s device\n", which);
        return 1;
    }
    for (unsigned i = 0; i < bi->n_e820; i++)
        if (bi->e820[i].type == 1 && bi->e820[i].addr + bi->e820[i].size > ram_end)
            ram_end = bi->e820[i].addr + bi->e820[i].size;
    vio_write(dev, VIRTIO_MMIO_QUEUE_SEL, (uint32_t)qindex());
    num_max = vio_read(dev, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (num_max && num_max <= 16384)
        big_mem = vio_alloc(26ULL * 2 * num_max + 3 * 4096, 4096);
    printf("ABUSE_ENV ram_end=0x%lx num_max=%u base=0x%lx\n", ram_end, num_max, dev->base);
    if (bring_up() != 0 || !normal_read()) {
        printf("FAIL baseline request status=0x%x\n", vio_status(dev));
        return 1;
    }
    int ran = 0, recovered = 0;
    for (int i = 0; i < NCASES; i++) {
        int generic = cases[i].target == T_ANY;
        if ((generic ? !any : !own || cases[i].target != target) || !selected(list, cases[i].name))
            continue;
        detail[0] = 0;
        dlen = 0;
        if (cases[i].needs_working_device && bring_up() != 0) {
            printf("ABUSE %s setup_failed broken\n", cases[i].name);
            ran++;
            continue;
        }
        int r = cases[i].run();
        uint32_t status_after = vio_status(dev);
        int ok = bring_up() == 0 && normal_read();
        ran++;
        recovered += ok;
        printf("ABUSE %s %s %s status=0x%x%s%s\n", cases[i].name, result_name(r), ok ? "recovered" : "broken",
               status_after, detail[0] ? " " : "", detail);
    }
    printf("ABUSE_SUMMARY cases=%d recovered=%d\n", ran, recovered);
    if (ran == 0 || recovered != ran) {
        printf("FAIL not every case recovered\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
