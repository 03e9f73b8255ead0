/* Minimal modern virtio-mmio driver for test payloads (see virtio.h for the contract). */
#include "virtio.h"

extern char __image_end[];

uint32_t vio_int_seen;
int vio_no_ack;

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* ---- config space ---- */
uint8_t vio_cfg8(const struct vio_dev *d, uint32_t off) { return mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off); }
uint16_t vio_cfg16(const struct vio_dev *d, uint32_t off) { return mmio_read16(d->base + VIRTIO_MMIO_CONFIG + off); }
uint32_t vio_cfg32(const struct vio_dev *d, uint32_t off) { return mmio_read32(d->base + VIRTIO_MMIO_CONFIG + off); }

uint64_t vio_cfg64(const struct vio_dev *d, uint32_t off) {
    uint64_t v = 0;
    for (int tries = 0; tries < 4; tries++) {
        uint32_t gen = vio_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
        uint32_t lo = vio_cfg32(d, off), hi = vio_cfg32(d, off + 4);
        v = ((uint64_t)hi << 32) | lo;
        if (vio_read(d, VIRTIO_MMIO_CONFIG_GENERATION) == gen)
            break;
    }
    return v;
}

/* ---- command line ---- */
/* Decimal or 0x-hex number at *p; advances *p. Returns 1 when at least one digit was read. */
static int parse_num(const char **p, uint64_t *out) {
    const char *s = *p;
    uint64_t v = 0;
    unsigned base = 10;
    int digits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++, digits++) {
        unsigned dg;
        if (*s >= '0' && *s <= '9')
            dg = (unsigned)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            dg = (unsigned)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            dg = (unsigned)(*s - 'A' + 10);
        else
            break;
        v = v * base + dg;
    }
    *p = s;
    *out = v;
    return digits > 0;
}

/* "<size>[KMG]@<base>:<irq>[:<id>]" ending at a space or NUL. Returns 1 when well formed. */
static int parse_entry(const char *s, uint64_t *size, uint64_t *base, uint64_t *irq) {
    if (!parse_num(&s, size))
        return 0;
    if (*s == 'K' || *s == 'k')
        *size <<= 10, s++;
    else if (*s == 'M' || *s == 'm')
        *size <<= 20, s++;
    else if (*s == 'G' || *s == 'g')
        *size <<= 30, s++;
    if (*s++ != '@' || !parse_num(&s, base) || *s++ != ':' || !parse_num(&s, irq))
        return 0;
    if (*s == ':') {
        uint64_t id;
        s++;
        if (!parse_num(&s, &id))
            return 0;
    }
    return *s == 0 || *s == ' ';
}

int vio_find(const char *cmdline, struct vio_dev *devs, int max) {
    static const char key[] = "virtio_mmio.device=";
    const size_t klen = sizeof(key) - 1;
    int n = 0;
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - word) <= klen || strncmp(word, key, klen) != 0)
            continue;
        uint64_t size, base, irq;
        if (!parse_entry(word + klen, &size, &base, &irq)) {
            printf("VIRTIO skip malformed\n");
            continue;
        }
        if (size < 0x100 || base >= 0x100000000ULL || base + size > 0x100000000ULL || (base & 3)) {
            printf("VIRTIO skip base=0x%lx size=0x%lx out_of_range\n", base, size);
            continue;
        }
        uint32_t magic = mmio_read32(base + VIRTIO_MMIO_MAGIC);
        uint32_t version = mmio_read32(base + VIRTIO_MMIO_VERSION);
        uint32_t id = mmio_read32(base + VIRTIO_MMIO_DEVICE_ID);
        if (magic != VIRTIO_MMIO_MAGIC_VALUE || version != 2 || id == 0) {
            printf("VIRTIO skip base=0x%lx magic=0x%x version=%u id=%u\n", base, magic, version, id);
            continue;
        }
        if (n >= max) {
            printf("VIRTIO skip base=0x%lx too_many\n", base);
            continue;
        }
        struct vio_dev *d = &devs[n];
        memset(d, 0, sizeof(*d));
        d->base = base;
        d->size = size;
        d->irq = (uint32_t)irq;
        d->version = version;
        d->device_id = id;
        d->vendor_id = mmio_read32(base + VIRTIO_MMIO_VENDOR_ID);
        printf("VIRTIO dev %d base=0x%lx size=0x%lx irq=%u id=%u version=%u vendor=0x%x\n", n, base, size,
               (unsigned)irq, id, version, d->vendor_id);
        n++;
    }
    return n;
}

struct vio_dev *vio_nth(struct vio_dev *devs, int count, uint32_t device_id, int n) {
    for (int i = 0; i < count; i++)
        if (devs[i].device_id == device_id && n-- == 0)
            return &devs[i];
    return 0;
}

/* ---- status and features ---- */
void vio_reset(struct vio_dev *d) {
    vio_write(d, VIRTIO_MMIO_STATUS, 0);
    for (int i = 0; i < 1000 && vio_status(d) != 0; i++)
        bh_udelay(100);
}

int vio_init(struct vio_dev *d, uint64_t wanted) {
    vio_reset(d);
    vio_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    vio_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    vio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t lo = vio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    vio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    uint64_t hi = vio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    d->device_features = (hi << 32) | lo;
    if (!(d->device_features >> VIRTIO_F_VERSION_1 & 1)) {
        vio_write(d, VIRTIO_MMIO_STATUS, vio_status(d) | VIRTIO_STATUS_FAILED);
        return -1;
    }
    uint64_t feats = (wanted & d->device_features) | (1ULL << VIRTIO_F_VERSION_1);
    vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)feats);
    vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(feats >> 32));
    uint32_t st = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK;
    vio_write(d, VIRTIO_MMIO_STATUS, st);
    if (!(vio_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
        vio_write(d, VIRTIO_MMIO_STATUS, vio_status(d) | VIRTIO_STATUS_FAILED);
        return -1;
    }
    d->features = feats;
    return 0;
}

void vio_driver_ok(struct vio_dev *d) { vio_write(d, VIRTIO_MMIO_STATUS, vio_status(d) | VIRTIO_STATUS_DRIVER_OK); }

/* ---- queues ---- */
int vio_queue_setup_raw(struct vio_dev *d, struct vio_queue *q, uint32_t index, uint16_t size, uint64_t desc,
                        uint64_t avail, uint64_t used) {
    memset(q, 0, sizeof(*q));
    q->dev = d;
    q->index = index;
    q->size = size;
    q->desc = (volatile struct virtq_desc *)desc;
    q->avail = (volatile struct virtq_avail *)avail;
    q->used = (volatile struct virtq_used *)used;
    vio_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
    vio_write(d, VIRTIO_MMIO_QUEUE_NUM, size);
    vio_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    vio_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    vio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    vio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    vio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    vio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    vio_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    return (int)(vio_read(d, VIRTIO_MMIO_QUEUE_READY) & 1);
}

int vio_queue_setup(struct vio_dev *d, struct vio_queue *q, uint32_t index, uint16_t want) {
    vio_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
    if (vio_read(d, VIRTIO_MMIO_QUEUE_READY) != 0)
        return -1;
    uint32_t max = vio_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0)
        return -1;
    uint16_t size = want;
    if (size > max)
        size = (uint16_t)max;
    /* keep a power of two */
    while (size & (size - 1))
        size &= (uint16_t)(size - 1);
    uint64_t dsz = 16ULL * size, asz = 6 + 2ULL * size, usz = 6 + 8ULL * size;
    uint64_t desc = vio_alloc(dsz, 4096), avail = vio_alloc(asz, 64), used = vio_alloc(usz, 4096);
    if (!desc || !avail || !used)
        return -1;
    memset((void *)desc, 0, dsz);
    memset((void *)avail, 0, asz);
    memset((void *)used, 0, usz);
    return vio_queue_setup_raw(d, q, index, size, desc, avail, used) == 1 ? 0 : -1;
}

uint16_t vio_post(struct vio_queue *q, const struct vio_buf *bufs, int n) {
    uint16_t head = q->next_desc;
    uint16_t slot = head;
    for (int i = 0; i < n; i++) {
        uint16_t next = (uint16_t)((slot + 1) % q->size);
        volatile struct virtq_desc *dp = &q->desc[slot];
        dp->addr = bufs[i].addr;
        dp->len = bufs[i].len;
        dp->flags = (uint16_t)((i + 1 < n ? VIRTQ_DESC_F_NEXT : 0) | (bufs[i].device_writes ? VIRTQ_DESC_F_WRITE : 0));
        dp->next = next;
        slot = next;
    }
    q->next_desc = slot;
    q->avail->ring[q->avail_idx % q->size] = head;
    barrier();
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
    barrier();
    return head;
}

void vio_notify(struct vio_queue *q) { vio_write(q->dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->index); }

uint16_t vio_submit(struct vio_queue *q, const struct vio_buf *bufs, int n) {
    uint16_t head = vio_post(q, bufs, n);
    vio_notify(q);
    return head;
}

int vio_wait(struct vio_queue *q, uint64_t timeout_us, uint32_t *id, uint32_t *len) {
    uint64_t start = rdtsc();
    uint64_t limit = timeout_us * 4000; /* at most 4 GHz: never shorter than asked */
    for (uint32_t spin = 0;; spin++) {
        if (q->used->idx != q->last_used) {
            barrier();
            volatile struct virtq_used_elem *e = &q->used->ring[q->last_used % q->size];
            if (id)
                *id = e->id;
            if (len)
                *len = e->len;
            q->last_used++;
            if (vio_no_ack)
                return VIO_DONE;
            uint32_t isr = vio_read(q->dev, VIRTIO_MMIO_INTERRUPT_STATUS);
            vio_int_seen |= isr;
            if (isr)
                vio_write(q->dev, VIRTIO_MMIO_INTERRUPT_ACK, isr);
            return VIO_DONE;
        }
        if ((spin & 63) == 63 && vio_status(q->dev) & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED))
            return VIO_NEEDS_RESET;
        if (rdtsc() - start > limit)
            return VIO_TIMEOUT;
        cpu_relax();
    }
}

int vio_xfer(struct vio_queue *q, const struct vio_buf *bufs, int n, uint64_t timeout_us, uint32_t *len) {
    vio_submit(q, bufs, n);
    return vio_wait(q, timeout_us, 0, len);
}

/* ---- arena ---- */
static uint64_t arena_next, arena_end;

void vio_arena_init(const struct bh_bootinfo *bi) {
    uint64_t start = ((uint64_t)(uintptr_t)__image_end + 0xffff) & ~0xffffULL;
    uint64_t end = start + (8ULL << 20); /* no memory map (bzImage via real mode): assume 8 MiB */
    for (unsigned i = 0; i < bi->n_e820; i++) {
        const struct bh_e820 *e = &bi->e820[i];
        if (e->type == 1 && e->addr <= start && start < e->addr + e->size) {
            end = e->addr + e->size;
            break;
        }
    }
    if (end > 0xc0000000ULL)
        end = 0xc0000000ULL; /* 3..4 GiB is mapped uncached */
    arena_next = start;
    arena_end = end;
}

uint64_t vio_alloc(uint64_t size, uint64_t align) {
    if (!arena_next)
        return 0;
    uint64_t a = (arena_next + align - 1) & ~(align - 1);
    if (a < arena_next || size > arena_end - a || a > arena_end)
        return 0;
    arena_next = a + size;
    return a;
}

uint64_t vio_arena_free_bytes(void) { return arena_end > arena_next ? arena_end - arena_next : 0; }

/* ---- helpers ---- */
uint64_t vio_cmdline_u64(const struct bh_bootinfo *bi, const char *key, uint64_t dflt) {
    char buf[32];
    uint64_t v;
    if (bh_cmdline_get(bi->cmdline, key, buf, sizeof(buf)) && bh_parse_u64(buf, &v))
        return v;
    return dflt;
}

uint64_t vio_rand(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

void vio_pattern(void *p, uint64_t n, uint64_t seed, uint64_t first_sector) {
    /* word at disk byte offset o: (seed * K1) ^ (o * K2), little endian */
    uint64_t *w = p;
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL;
    uint64_t o = first_sector * 512;
    for (uint64_t i = 0; i < n / 8; i++, o += 8)
        w[i] = s ^ (o * 0xFF51AFD7ED558CCDULL);
}

int64_t vio_compare(const void *a, const void *b, uint64_t n) {
    const uint64_t *x = a, *y = b;
    for (uint64_t i = 0; i < n / 8; i++)
        if (x[i] != y[i])
            return (int64_t)(i * 8);
    return -1;
}
