/*
 * A minimal modern virtio-mmio (version 2) driver for test payloads: split queues, polled completion.
 *
 * Devices are found on the command line (`virtio_mmio.device=<size>@<base>:<irq>[:<id>]`, sizes with
 * an optional K/M/G suffix, as QEMU microvm with acpi=off and bulkhead announce them), probed
 * (MagicValue "virt", Version 2, DeviceID != 0) and driven through the virtio 1.2 §3.1.1 sequence:
 * reset, ACKNOWLEDGE, DRIVER, 64-bit feature negotiation (VIRTIO_F_VERSION_1 required), FEATURES_OK
 * (read back), queue setup, DRIVER_OK.
 *
 * Requests are synchronous: submit one chain, notify, poll the used index (bounded by a TSC deadline,
 * and cut short when the device sets DEVICE_NEEDS_RESET or FAILED). Ring memory and data buffers
 * come from a bump arena placed after the image in usable RAM (vio_alloc).
 *
 * Ring-0 guest code is emulated on PVM hosts (~0.4 M instructions/s): nothing here loops over data.
 */
#ifndef BULKHEAD_VIRTIO_H
#define BULKHEAD_VIRTIO_H

#include "guest.h"

/* MMIO registers (virtio 1.2 §4.2.2). */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC_VALUE 0x74726976U /* "virt" */

#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

#define VIRTIO_INT_USED 0x1
#define VIRTIO_INT_CONFIG 0x2

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4

#define VIRTIO_F_VERSION_1 32

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
} __attribute__((packed));

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[]; /* [size], then used_event */
} __attribute__((packed));

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
} __attribute__((packed));

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[]; /* [size], then avail_event */
} __attribute__((packed));

#define VIO_MAX_DEVS 16

/* virtio-blk request header (virtio 1.2 §5.2.6) and the two request types every payload uses. */
#define VIO_BLK_T_IN 0
#define VIO_BLK_T_OUT 1
struct vio_blk_req {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
} __attribute__((packed));

struct vio_dev {
    uint64_t base;
    uint64_t size;
    uint32_t irq;
    uint32_t version;
    uint32_t device_id;
    uint32_t vendor_id;
    uint64_t device_features; /* as offered (both selector words) */
    uint64_t features;        /* negotiated */
};

struct vio_queue {
    struct vio_dev *dev;
    uint32_t index;
    uint16_t size;
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    uint16_t avail_idx; /* our shadow of avail->idx */
    uint16_t last_used; /* next used index we expect to consume */
    uint16_t next_desc; /* next descriptor slot handed out (round robin) */
};

struct vio_buf {
    uint64_t addr;
    uint32_t len;
    int device_writes; /* 1: VIRTQ_DESC_F_WRITE */
};

/* Wait results. */
#define VIO_DONE 1
#define VIO_TIMEOUT 0
#define VIO_NEEDS_RESET (-1) /* the device set DEVICE_NEEDS_RESET or FAILED while we waited */

/* Registers (32-bit, as §4.2.2.2 requires) and config space (any width). */
static inline uint32_t vio_read(const struct vio_dev *d, uint32_t off) { return mmio_read32(d->base + off); }
static inline void vio_write(const struct vio_dev *d, uint32_t off, uint32_t v) { mmio_write32(d->base + off, v); }
static inline uint32_t vio_status(const struct vio_dev *d) { return vio_read(d, VIRTIO_MMIO_STATUS); }
uint8_t vio_cfg8(const struct vio_dev *d, uint32_t off);
uint16_t vio_cfg16(const struct vio_dev *d, uint32_t off);
uint32_t vio_cfg32(const struct vio_dev *d, uint32_t off);
uint64_t vio_cfg64(const struct vio_dev *d, uint32_t off); /* two 32-bit reads, generation-checked */

/* Parse every virtio_mmio.device= entry of the command line (in order) and probe it. Entries that are
 * malformed, or whose registers do not read MagicValue/Version 2/DeviceID != 0, are reported with a
 * `VIRTIO skip ...` line and left out. Prints one `VIRTIO dev ...` line per device found.
 * Returns the number of devices stored in devs (at most max). */
int vio_find(const char *cmdline, struct vio_dev *devs, int max);
/* The n-th (0-based) device with this device id, or NULL. */
struct vio_dev *vio_nth(struct vio_dev *devs, int count, uint32_t device_id, int n);

/* Reset (status 0, then wait until it reads 0), ACKNOWLEDGE, DRIVER, read the 64 offered feature bits,
 * accept `wanted & offered | VERSION_1`, FEATURES_OK, and read it back. Returns 0, or -1 (after
 * setting FAILED) when the device lacks VERSION_1 or refuses FEATURES_OK. */
int vio_init(struct vio_dev *d, uint64_t wanted);
void vio_reset(struct vio_dev *d);
void vio_driver_ok(struct vio_dev *d);

/* Queue setup with rings from the arena (size = min(want, QueueNumMax)); 0 or -1 (no such queue,
 * already ready, or the device did not accept QueueReady). */
int vio_queue_setup(struct vio_dev *d, struct vio_queue *q, uint32_t index, uint16_t want);
/* The same with caller-chosen size and ring addresses, nothing checked (used by the abuse payload).
 * Returns what QueueReady reads back (1 accepted, 0 refused). */
int vio_queue_setup_raw(struct vio_dev *d, struct vio_queue *q, uint32_t index, uint16_t size,
                        uint64_t desc, uint64_t avail, uint64_t used);

/* Put a chain of n buffers on the ring (descriptors taken round robin), publish it, notify.
 * Returns the head descriptor index. Synchronous use only: at most `size` descriptors in flight. */
uint16_t vio_submit(struct vio_queue *q, const struct vio_buf *bufs, int n);
/* Publish without notifying / notify separately. */
uint16_t vio_post(struct vio_queue *q, const struct vio_buf *bufs, int n);
void vio_notify(struct vio_queue *q);
/* Poll for the next used element up to timeout_us; on VIO_DONE stores id and len and acknowledges
 * the used-buffer interrupt (InterruptStatus/InterruptAck). */
int vio_wait(struct vio_queue *q, uint64_t timeout_us, uint32_t *id, uint32_t *len);
/* submit + wait. */
int vio_xfer(struct vio_queue *q, const struct vio_buf *bufs, int n, uint64_t timeout_us, uint32_t *len);
/* Latched interrupt status bits seen by vio_wait (VIRTIO_INT_*), for reports. */
extern uint32_t vio_int_seen;
/* Set to 1 to skip the InterruptStatus read + InterruptAck write after each completion. */
extern int vio_no_ack;

/* Bump allocator over usable RAM after the image (never freed). Returns 0 when exhausted. */
void vio_arena_init(const struct bh_bootinfo *bi);
uint64_t vio_alloc(uint64_t size, uint64_t align);
uint64_t vio_arena_free_bytes(void);

/* Small helpers for payloads. */
uint64_t vio_cmdline_u64(const struct bh_bootinfo *bi, const char *key, uint64_t dflt);
/* xorshift64* PRNG (state must be non-zero). */
uint64_t vio_rand(uint64_t *state);
/* Fill n bytes at p with a pattern derived from (seed, sector) in 8-byte words. */
void vio_pattern(void *p, uint64_t n, uint64_t seed, uint64_t first_sector);
/* Compare 8-byte words; index of the first differing byte, or -1. */
int64_t vio_compare(const void *a, const void *b, uint64_t n);

#endif
