/*
 * virtio-net: sends one Ethernet frame (broadcast destination, source = the MAC from config space,
 * ethertype 0x88b5, payload "bulkhead-ping <seed>") on the TX queue and waits (`net_timeout_ms`,
 * default 10000) for a frame of ethertype 0x88b5 on the RX queue; frames of other types (IPv6
 * router solicitations and the like) are counted, reported and their buffers reposted.
 * Output format: tests/payloads/README.md, section "virtio payloads".
 */
#include "virtio.h"

#define NET_F_MAC 5
#define NET_F_STATUS 16
#define HDR_LEN 12 /* struct virtio_net_hdr_v1 (VERSION_1 always has num_buffers) */
#define RX_BUF 1536
#define RX_BUFS 4
#define ETHERTYPE 0x88b5
#define MIN_FRAME 60

static struct vio_dev devs[VIO_MAX_DEVS];
static struct vio_queue rxq, txq;
static uint64_t rxbuf[RX_BUFS];

static void post_rx(uint64_t addr) {
    struct vio_buf b = {addr, RX_BUF, 1};
    vio_post(&rxq, &b, 1);
}

static void print_mac(const char *key, const uint8_t *m) {
    printf(" %s=%02x:%02x:%02x:%02x:%02x:%02x", key, m[0], m[1], m[2], m[3], m[4], m[5]);
}

int main(const struct bh_bootinfo *bi) {
    vio_arena_init(bi);
    uint64_t seed = vio_cmdline_u64(bi, "seed", 1);
    uint64_t timeout_ms = vio_cmdline_u64(bi, "net_timeout_ms", 10000);
    int count = vio_find(bi->cmdline, devs, VIO_MAX_DEVS);
    struct vio_dev *d = vio_nth(devs, count, VIRTIO_ID_NET, 0);
    if (!d) {
        printf("FAIL no virtio-net device\n");
        return 1;
    }
    if (vio_init(d, 1ULL << NET_F_MAC | 1ULL << NET_F_STATUS) != 0 || vio_queue_setup(d, &rxq, 0, 16) != 0 ||
        vio_queue_setup(d, &txq, 1, 16) != 0) {
        printf("FAIL net setup status=0x%x\n", vio_status(d));
        return 1;
    }
    uint8_t mac[6];
    for (int i = 0; i < 6; i++)
        mac[i] = d->features >> NET_F_MAC & 1 ? vio_cfg8(d, (uint32_t)i) : (uint8_t)(i == 0 ? 0x02 : i);
    unsigned link = d->features >> NET_F_STATUS & 1 ? vio_cfg16(d, 6) : 1;
    for (int i = 0; i < RX_BUFS; i++) {
        rxbuf[i] = vio_alloc(RX_BUF, 64);
        post_rx(rxbuf[i]);
    }
    vio_driver_ok(d);
    vio_notify(&rxq);
    printf("NET features=0x%lx offered=0x%lx link=%u", d->features, d->device_features, link);
    print_mac("mac", mac);
    printf("\n");

    /* TX: header (all zero: no offloads) + frame padded to the Ethernet minimum */
    uint64_t tx = vio_alloc(HDR_LEN + 128, 64);
    uint8_t *p = (uint8_t *)tx;
    memset(p, 0, HDR_LEN + 128);
    uint8_t *f = p + HDR_LEN;
    memset(f, 0xff, 6);
    memcpy(f + 6, mac, 6);
    f[12] = ETHERTYPE >> 8;
    f[13] = ETHERTYPE & 0xff;
    char *payload = (char *)f + 14;
    memcpy(payload, "bulkhead-ping ", 14);
    char digits[24];
    int nd = 0;
    uint64_t s = seed;
    do {
        digits[nd++] = (char)('0' + s % 10);
        s /= 10;
    } while (s);
    int plen = 14;
    while (nd)
        payload[plen++] = digits[--nd];
    uint32_t flen = 14 + (uint32_t)plen;
    if (flen < MIN_FRAME)
        flen = MIN_FRAME;
    struct vio_buf tb = {tx, HDR_LEN + flen, 0};
    uint32_t used_len = 0;
    int r = vio_xfer(&txq, &tb, 1, 5000000, &used_len);
    printf("NET tx len=%u payload=%s result=%d\n", flen, payload, r);
    if (r != VIO_DONE) {
        printf("FAIL tx\n");
        return 1;
    }

    /* RX: wait for our ethertype, bounded */
    uint64_t start = rdtsc();
    int others = 0;
    for (;;) {
        uint64_t spent_ms = (rdtsc() - start) / 4000000; /* at most 4 GHz: never shorter than asked */
        if (spent_ms >= timeout_ms) {
            printf("NET rx timeout others=%d\n", others);
            printf("FAIL rx timeout\n");
            return 1;
        }
        uint32_t id = 0, len = 0;
        r = vio_wait(&rxq, (timeout_ms - spent_ms) * 1000, &id, &len);
        if (r != VIO_DONE)
            continue; /* timeout is handled above; NEEDS_RESET ends in the same timeout */
        if (id >= rxq.size || len < HDR_LEN + 14 || len > RX_BUF) {
            printf("NET rx bad id=%u len=%u\n", id, len);
            printf("FAIL rx element\n");
            return 1;
        }
        uint64_t addr = rxq.desc[id].addr;
        const uint8_t *rf = (const uint8_t *)addr + HDR_LEN;
        unsigned type = (unsigned)rf[12] << 8 | rf[13];
        uint32_t rlen = len - HDR_LEN;
        if (type != ETHERTYPE) {
            others++;
            printf("NET rx_other ethertype=0x%04x len=%u\n", type, rlen);
            post_rx(addr);
            vio_notify(&rxq);
            continue;
        }
        char text[65];
        uint32_t i = 0;
        for (; i < 64 && 14 + i < rlen && rf[14 + i]; i++)
            text[i] = (rf[14 + i] >= ' ' && rf[14 + i] < 127) ? (char)rf[14 + i] : '?';
        text[i] = 0;
        printf("NET rx len=%u", rlen);
        print_mac("dst", rf);
        print_mac("src", rf + 6);
        printf(" payload=%s\n", text);
        if (memcmp(rf, mac, 6) != 0) {
            printf("FAIL rx frame not addressed to us\n");
            return 1;
        }
        break;
    }
    printf("NET interrupt_status_seen=0x%x\n", vio_int_seen);
    printf("PASS\n");
    return 0;
}
