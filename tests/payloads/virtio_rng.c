/*
 * virtio-rng: reads `rng_bytes=N` (default 64, at most 4096) bytes twice from the first virtio-rng
 * device, checks that each read is complete, not all zero, and that the two reads differ.
 * Output format: tests/payloads/README.md, section "virtio payloads".
 */
#include "virtio.h"

#define TIMEOUT_US 5000000
#define MAX_BYTES 4096

static struct vio_dev devs[VIO_MAX_DEVS];
static struct vio_queue q;

/* Fill n bytes, issuing requests until the device supplied them all (it may give fewer per request). */
static int fill(uint64_t buf, uint32_t n, int *requests) {
    uint32_t got = 0;
    *requests = 0;
    while (got < n && *requests < 64) {
        struct vio_buf b = {buf + got, n - got, 1};
        uint32_t len = 0;
        int r = vio_xfer(&q, &b, 1, TIMEOUT_US, &len);
        (*requests)++;
        if (r != VIO_DONE) {
            printf("RNG wait_failed result=%d\n", r);
            return -1;
        }
        if (len > n - got) {
            printf("RNG bad_used_len len=%u\n", len);
            return -1;
        }
        got += len;
    }
    return got == n ? 0 : -1;
}

static void dump(const char *tag, const uint8_t *p, uint32_t n, int requests) {
    int zero = 1;
    for (uint32_t i = 0; i < n; i++)
        zero &= p[i] == 0;
    printf("RNG %s bytes=%u requests=%d all_zero=%d head=", tag, n, requests, zero);
    for (uint32_t i = 0; i < n && i < 16; i++)
        printf("%02x", p[i]);
    printf("\n");
}

int main(const struct bh_bootinfo *bi) {
    vio_arena_init(bi);
    uint32_t n = (uint32_t)vio_cmdline_u64(bi, "rng_bytes", 64);
    if (n == 0 || n > MAX_BYTES)
        n = 64;
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
    printf("RNG features=0x%lx queue=%u\n", d->features, q.size);
    uint64_t a = vio_alloc(n, 64), b = vio_alloc(n, 64);
    memset((void *)a, 0, n);
    memset((void *)b, 0, n);
    int ra = 0, rb = 0;
    if (fill(a, n, &ra) != 0 || fill(b, n, &rb) != 0) {
        printf("FAIL rng read\n");
        return 1;
    }
    dump("read1", (const uint8_t *)a, n, ra);
    dump("read2", (const uint8_t *)b, n, rb);
    int same = memcmp((void *)a, (void *)b, n) == 0;
    printf("RNG differ=%d\n", !same);
    int zero_a = 1, zero_b = 1;
    for (uint32_t i = 0; i < n; i++) {
        zero_a &= ((uint8_t *)a)[i] == 0;
        zero_b &= ((uint8_t *)b)[i] == 0;
    }
    if (zero_a || zero_b || same) {
        printf("FAIL rng data\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
