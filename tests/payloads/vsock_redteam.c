/*
 * Red-team guest for virtio-vsock: malformed headers, lying lengths (Firecracker CVE-2019-18960's class),
 * malformed chains, credit abuse and a connection flood. Host listener expected at port `vsock_port`
 * (default 4321) that accepts and never reads. One `RT <case> <outcome>` line per case, then
 * `RT alive status=0x..` and PASS when the device still answers. The host test checks the outcomes and
 * that the VMM (jailed worker) stayed up.
 */
#include "vsock.h"

#define T_US 3000000

static uint8_t data[VS_BUF];

/* Drain rx until quiet; return the op of the first packet for (src_port -> our port), or 0. */
static int expect(uint32_t our_port, uint64_t timeout_us) {
    struct vs_hdr h;
    int op = 0;
    for (;;) {
        int n = vs_recv(&h, data, sizeof data, op ? 200000 : timeout_us);
        if (n < 0)
            return op;
        if (!op && h.dst_port == our_port)
            op = h.op;
    }
}

static void bad(const char *name, struct vs_hdr h, uint32_t payload, uint32_t chain_len) {
    int r = vs_send_raw(&h, data, payload, chain_len);
    int op = expect(h.src_port, T_US);
    printf("RT %s xfer=%d reply_op=%d status=0x%x\n", name, r, op, vio_status(vs_dev));
}

int main(const struct bh_bootinfo *bi) {
    if (vs_setup(bi) != 0)
        return 1;
    uint32_t port = (uint32_t)vio_cmdline_u64(bi, "vsock_port", 4321);
    struct vs_hdr ok = {vs_cid, VS_HOST_CID, 6000, port, 0, VS_TYPE_STREAM, VS_OP_REQUEST, 0, VS_BUF_ALLOC, 0};
    struct vs_hdr h;

    h = ok, h.src_port = 6001, h.type = 2;
    bad("type_seqpacket", h, 0, VS_HDR);
    h = ok, h.src_port = 6002, h.src_cid = vs_cid + 1;
    bad("src_cid_spoof", h, 0, VS_HDR);
    h = ok, h.src_port = 6003, h.dst_cid = 5;
    bad("dst_cid_other_guest", h, 0, VS_HDR);
    h = ok, h.src_port = 6004, h.op = VS_OP_RW, h.len = 60000;
    bad("len_past_chain", h, 16, VS_HDR + 16);
    h = ok, h.src_port = 6005, h.op = VS_OP_RW, h.len = 0xffffffffu;
    bad("len_u32_max", h, 16, VS_HDR + 16);
    h = ok, h.src_port = 6006, h.len = 8;
    bad("len_on_request", h, 8, VS_HDR + 8);
    h = ok, h.src_port = 6007, h.op = 42;
    bad("op_unknown", h, 0, VS_HDR);
    h = ok, h.src_port = 6008, h.op = VS_OP_CREDIT_REQUEST;
    bad("credit_request_no_stream", h, 0, VS_HDR);
    h = ok, h.src_port = 6009;
    bad("short_chain", h, 0, 20);

    /* a TX chain with a device-writable part */
    {
        memcpy((void *)vs_txbuf, &ok, VS_HDR);
        struct vio_buf b[2] = {{vs_txbuf, VS_HDR, 0}, {vs_txbuf + VS_HDR, 64, 1}};
        uint32_t len = 0;
        int r = vio_xfer(&vs_txq, b, 2, T_US, &len);
        printf("RT tx_writable xfer=%d reply_op=%d status=0x%x\n", r, expect(ok.src_port, 300000), vio_status(vs_dev));
    }

    /* credit abuse: connect, then push far more than the host's buf_alloc into a listener that never reads */
    {
        h = ok, h.src_port = 6100;
        vs_send_raw(&h, 0, 0, VS_HDR);
        int op = expect(6100, T_US);
        int sent = 0, reset = 0;
        if (op == VS_OP_RESPONSE) {
            struct vs_hdr rw = ok;
            rw.src_port = 6100, rw.op = VS_OP_RW, rw.len = VS_BUF;
            for (sent = 0; sent < 400 && !reset; sent++) {
                vs_send_raw(&rw, data, VS_BUF, VS_HDR + VS_BUF);
                uint32_t id, len;
                while (vio_wait(&vs_rxq, 0, &id, &len) == VIO_DONE) {
                    struct vs_hdr *p = (struct vs_hdr *)vs_rxq.desc[id].addr;
                    reset |= p->op == VS_OP_RST && p->dst_port == 6100;
                    struct vio_buf b = {vs_rxq.desc[id].addr, VS_HDR + VS_BUF, 1};
                    vio_post(&vs_rxq, &b, 1);
                    vio_notify(&vs_rxq);
                }
            }
        }
        printf("RT credit_abuse connect_op=%d packets=%d reset=%d status=0x%x\n", op, sent, reset, vio_status(vs_dev));
    }

    /* connection flood: 80 REQUESTs (above the device's cap of 64) */
    {
        int rst = 0, resp = 0;
        for (int i = 0; i < 80; i++) {
            h = ok, h.src_port = 7000 + (uint32_t)i;
            vs_send_raw(&h, 0, 0, VS_HDR);
            uint32_t id, len;
            while (vio_wait(&vs_rxq, 0, &id, &len) == VIO_DONE) {
                struct vs_hdr *p = (struct vs_hdr *)vs_rxq.desc[id].addr;
                rst += p->op == VS_OP_RST;
                resp += p->op == VS_OP_RESPONSE;
                struct vio_buf b = {vs_rxq.desc[id].addr, VS_HDR + VS_BUF, 1};
                vio_post(&vs_rxq, &b, 1);
                vio_notify(&vs_rxq);
            }
        }
        struct vs_hdr p;
        for (;;) {
            int n = vs_recv(&p, data, sizeof data, 300000);
            if (n < 0)
                break;
            rst += p.op == VS_OP_RST;
            resp += p.op == VS_OP_RESPONSE;
        }
        printf("RT conn_flood responses=%d rsts=%d status=0x%x\n", resp, rst, vio_status(vs_dev));
    }

    /* still alive: a REQUEST to a port nobody listens on is answered with RST */
    h = ok, h.src_port = 6200, h.dst_port = port + 1000;
    vs_send_raw(&h, 0, 0, VS_HDR);
    int op = expect(6200, T_US);
    uint32_t st = vio_status(vs_dev);
    printf("RT alive reply_op=%d status=0x%x\n", op, st);
    if (op != VS_OP_RST || (st & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED))) {
        printf("FAIL device stopped answering\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
