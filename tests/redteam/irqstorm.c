/* Red team: interrupt and notification storms against the VMM's I/O paths.
 *
 * 1. COM1: IER toggled between 0x02 (THR-empty interrupt enabled: each enable raises the line) and
 *    0x00, `serial=<n>` times (default 50000).
 * 2. virtio-rng (first device): queue 0 set up and live; QueueNotify 0 written `notify=<n>` times
 *    (default 50000) with no new buffers (the ioeventfd path), then QueueNotify 7 (a queue that does
 *    not exist: an MMIO exit each) `notify` times, InterruptAck 0xffffffff `notify` times.
 * 3. Afterwards the device must still serve a normal 64-byte request.
 * Interrupts stay disabled in the guest (IF=0): the storm is on the host side (irqfd / eventfd /
 * exits), which is what the test measures. Output: `STORM serial=<n> notify_ok=<n> notify_bad=<n>
 * ack=<n>`, `RNG after status=<done|timeout|needs_reset> bytes=<n> all_zero=<0|1>`, PASS or FAIL.
 */
#include "virtio.h"

int bh_want_mptable = 0;

static struct vio_dev devs[VIO_MAX_DEVS];
static struct vio_queue q;

int main(const struct bh_bootinfo *bi) {
    uint64_t nserial = vio_cmdline_u64(bi, "serial", 50000);
    uint64_t nnotify = vio_cmdline_u64(bi, "notify", 50000);
    vio_arena_init(bi);
    for (uint64_t i = 0; i < nserial; i++) {
        outb(BH_COM1 + 1, 0x02);
        outb(BH_COM1 + 1, 0x00);
    }
    int count = vio_find(bi->cmdline, devs, VIO_MAX_DEVS);
    struct vio_dev *d = vio_nth(devs, count, VIRTIO_ID_RNG, 0);
    if (!d) {
        printf("FAIL no virtio-rng device\n");
        return 1;
    }
    if (vio_init(d, 0) != 0 || vio_queue_setup(d, &q, 0, 8) != 0) {
        printf("FAIL rng setup status=0x%x\n", vio_status(d));
        return 1;
    }
    vio_driver_ok(d);
    for (uint64_t i = 0; i < nnotify; i++)
        vio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    for (uint64_t i = 0; i < nnotify; i++)
        vio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    for (uint64_t i = 0; i < nnotify; i++)
        vio_write(d, VIRTIO_MMIO_INTERRUPT_ACK, 0xffffffffU);
    printf("STORM serial=%lu notify_ok=%lu notify_bad=%lu ack=%lu\n", nserial, nnotify, nnotify, nnotify);

    uint8_t *buf = (uint8_t *)vio_alloc(64, 64);
    memset(buf, 0, 64);
    struct vio_buf b = {(uint64_t)buf, 64, 1};
    uint32_t len = 0;
    int r = vio_xfer(&q, &b, 1, 2000000, &len);
    int zero = 1;
    for (int i = 0; i < 64; i++)
        zero &= buf[i] == 0;
    const char *st = r == VIO_DONE ? "done" : r == VIO_NEEDS_RESET ? "needs_reset" : "timeout";
    printf("RNG after status=%s bytes=%u all_zero=%d\n", st, len, zero);
    if (r != VIO_DONE || len != 64 || zero) {
        printf("FAIL the device did not serve a request after the storm\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
