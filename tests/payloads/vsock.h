/*
 * A minimal polled virtio-vsock driver (virtio 1.2 §5.10) for test payloads, on virtio.h.
 * Queues: 0 rx (VS_RX_BUFS device-writable buffers of 44 + VS_BUF bytes, reposted after each packet),
 * 1 tx (one device-readable buffer per packet, sent synchronously), 2 event (set up, never filled).
 * Our credit: buf_alloc VS_BUF_ALLOC, fwd_cnt = payload bytes received (consumed at once).
 */
#ifndef BULKHEAD_VSOCK_H
#define BULKHEAD_VSOCK_H

#include "virtio.h"

#define VIRTIO_ID_VSOCK 19
#define VS_HOST_CID 2
#define VS_TYPE_STREAM 1
#define VS_OP_REQUEST 1
#define VS_OP_RESPONSE 2
#define VS_OP_RST 3
#define VS_OP_SHUTDOWN 4
#define VS_OP_RW 5
#define VS_OP_CREDIT_UPDATE 6
#define VS_OP_CREDIT_REQUEST 7
#define VS_HDR 44
#define VS_BUF 4096
#define VS_RX_BUFS 8
#define VS_BUF_ALLOC 65536

struct vs_hdr {
    uint64_t src_cid, dst_cid;
    uint32_t src_port, dst_port, len;
    uint16_t type, op;
    uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static struct vio_dev vs_devs[VIO_MAX_DEVS];
static struct vio_dev *vs_dev;
static struct vio_queue vs_rxq, vs_txq, vs_evq;
static uint64_t vs_cid, vs_txbuf;
static uint32_t vs_fwd_cnt;

static int vs_setup(const struct bh_bootinfo *bi) {
    vio_arena_init(bi);
    int count = vio_find(bi->cmdline, vs_devs, VIO_MAX_DEVS);
    vs_dev = vio_nth(vs_devs, count, VIRTIO_ID_VSOCK, 0);
    if (!vs_dev) {
        printf("FAIL no virtio-vsock device\n");
        return -1;
    }
    if (vio_init(vs_dev, 0) != 0 || vio_queue_setup(vs_dev, &vs_rxq, 0, 16) != 0 ||
        vio_queue_setup(vs_dev, &vs_txq, 1, 16) != 0 || vio_queue_setup(vs_dev, &vs_evq, 2, 4) != 0) {
        printf("FAIL vsock setup status=0x%x\n", vio_status(vs_dev));
        return -1;
    }
    vs_cid = vio_cfg64(vs_dev, 0);
    for (int i = 0; i < VS_RX_BUFS; i++) {
        struct vio_buf b = {vio_alloc(VS_HDR + VS_BUF, 64), VS_HDR + VS_BUF, 1};
        vio_post(&vs_rxq, &b, 1);
    }
    vs_txbuf = vio_alloc(VS_HDR + VS_BUF + 64, 64);
    vio_driver_ok(vs_dev);
    vio_notify(&vs_rxq);
    printf("VSOCK cid=%lu features=0x%lx\n", vs_cid, vs_dev->features);
    return 0;
}

/* Send a raw header (fields as given) + n payload bytes; the chain's length is VS_HDR + chain_extra.
 * Returns the vio_xfer result. */
static int vs_send_raw(const struct vs_hdr *h, const void *data, uint32_t n, uint32_t chain_len) {
    memcpy((void *)vs_txbuf, h, VS_HDR);
    if (n)
        memcpy((uint8_t *)vs_txbuf + VS_HDR, data, n);
    struct vio_buf b = {vs_txbuf, chain_len, 0};
    uint32_t len = 0;
    return vio_xfer(&vs_txq, &b, 1, 5000000, &len);
}

static int vs_send(uint32_t src_port, uint32_t dst_port, uint16_t op, uint32_t flags, const void *data, uint32_t n) {
    struct vs_hdr h = {vs_cid, VS_HOST_CID, src_port, dst_port, n, VS_TYPE_STREAM, op, flags, VS_BUF_ALLOC, vs_fwd_cnt};
    return vs_send_raw(&h, data, n, VS_HDR + n);
}

/* Wait for the next rx packet; copies the header and up to max payload bytes, reposts the buffer.
 * Returns the payload length, or -1 on timeout / device error. */
static int vs_recv(struct vs_hdr *h, void *data, uint32_t max, uint64_t timeout_us) {
    uint32_t id = 0, len = 0;
    int r = vio_wait(&vs_rxq, timeout_us, &id, &len);
    if (r != VIO_DONE) {
        printf("VSOCK rx wait=%d status=0x%x\n", r, vio_status(vs_dev));
        return -1;
    }
    if (id >= vs_rxq.size || len < VS_HDR || len > VS_HDR + VS_BUF) {
        printf("VSOCK rx bad id=%u len=%u\n", id, len);
        return -1;
    }
    uint64_t addr = vs_rxq.desc[id].addr;
    memcpy(h, (void *)addr, VS_HDR);
    uint32_t n = len - VS_HDR;
    if (h->len != n) {
        printf("VSOCK rx len mismatch hdr=%u used=%u\n", h->len, n);
        return -1;
    }
    if (data && n)
        memcpy(data, (uint8_t *)addr + VS_HDR, n < max ? n : max);
    if (h->op == VS_OP_RW)
        vs_fwd_cnt += n;
    struct vio_buf b = {addr, VS_HDR + VS_BUF, 1};
    vio_post(&vs_rxq, &b, 1);
    vio_notify(&vs_rxq);
    return (int)n;
}

static void vs_print(const char *tag, const struct vs_hdr *h) {
    printf("VSOCK %s op=%u src=%lu:%u dst=%lu:%u len=%u flags=%u buf_alloc=%u fwd_cnt=%u\n", tag, h->op,
           h->src_cid, h->src_port, h->dst_cid, h->dst_port, h->len, h->flags, h->buf_alloc, h->fwd_cnt);
}

#endif
