/*
 * virtio-vsock test driver (tests/payloads/vsock.h). `vsock_mode=`:
 *   1 listen: accept one REQUEST to `vsock_port` (default 1234), echo every RW back, end when the host
 *     shuts down (answering RST);
 *   2 connect: REQUEST to host port `vsock_port`, send "ping <seed>", expect the host to echo it, shut
 *     down both ways and expect the RST.
 * Output: `VSOCK ...` lines, then PASS or FAIL <why> (tests/payloads/README.md, "virtio payloads").
 */
#include "vsock.h"

#define TIMEOUT_US 20000000
#define GUEST_PORT 5000

static uint8_t data[VS_BUF];

static int listen_mode(uint32_t port) {
    struct vs_hdr h;
    int n = vs_recv(&h, data, sizeof data, TIMEOUT_US);
    if (n < 0 || h.op != VS_OP_REQUEST || h.dst_port != port || h.src_cid != VS_HOST_CID) {
        if (n >= 0)
            vs_print("unexpected", &h);
        printf("FAIL no request\n");
        return 1;
    }
    vs_print("request", &h);
    uint32_t peer = h.src_port;
    vs_send(port, peer, VS_OP_RESPONSE, 0, 0, 0);
    uint32_t echoed = 0;
    for (;;) {
        n = vs_recv(&h, data, sizeof data, TIMEOUT_US);
        if (n < 0) {
            printf("FAIL rx\n");
            return 1;
        }
        if (h.src_port != peer || h.dst_port != port) {
            vs_print("other", &h);
            continue;
        }
        if (h.op == VS_OP_RW) {
            vs_send(port, peer, VS_OP_RW, 0, data, (uint32_t)n);
            echoed += (uint32_t)n;
        } else if (h.op == VS_OP_SHUTDOWN) {
            vs_print("shutdown", &h);
            vs_send(port, peer, VS_OP_RST, 0, 0, 0);
            break;
        } else if (h.op == VS_OP_RST) {
            vs_print("rst", &h);
            break;
        } else if (h.op == VS_OP_CREDIT_REQUEST) {
            vs_send(port, peer, VS_OP_CREDIT_UPDATE, 0, 0, 0);
        }
    }
    printf("VSOCK echoed=%u\n", echoed);
    printf("PASS\n");
    return 0;
}

static int connect_mode(uint32_t port, uint64_t seed) {
    struct vs_hdr h;
    vs_send(GUEST_PORT, port, VS_OP_REQUEST, 0, 0, 0);
    int n = vs_recv(&h, data, sizeof data, TIMEOUT_US);
    if (n < 0 || h.op != VS_OP_RESPONSE) {
        if (n >= 0)
            vs_print("refused", &h);
        printf("FAIL connect\n");
        return 1;
    }
    vs_print("response", &h);
    char msg[32] = "ping ";
    int len = 5;
    char digits[24];
    int nd = 0;
    do {
        digits[nd++] = (char)('0' + seed % 10);
        seed /= 10;
    } while (seed);
    while (nd)
        msg[len++] = digits[--nd];
    msg[len++] = '\n';
    vs_send(GUEST_PORT, port, VS_OP_RW, 0, msg, (uint32_t)len);
    uint32_t got = 0;
    static char back[64];
    while (got < (uint32_t)len) {
        n = vs_recv(&h, data, sizeof data, TIMEOUT_US);
        if (n < 0 || h.op == VS_OP_RST || h.op == VS_OP_SHUTDOWN) {
            if (n >= 0)
                vs_print("early", &h);
            printf("FAIL echo\n");
            return 1;
        }
        if (h.op == VS_OP_RW) {
            for (int i = 0; i < n && got < sizeof back - 1; i++)
                back[got++] = (char)data[i];
        }
    }
    back[got] = 0;
    for (uint32_t i = 0; i < got; i++)
        if (back[i] == '\n')
            back[i] = 0;
    printf("VSOCK echo=%s\n", back);
    if (memcmp(back, msg, (size_t)len - 1) != 0) {
        printf("FAIL echo mismatch\n");
        return 1;
    }
    vs_send(GUEST_PORT, port, VS_OP_SHUTDOWN, 3, 0, 0);
    for (;;) {
        n = vs_recv(&h, data, sizeof data, TIMEOUT_US);
        if (n < 0) {
            printf("FAIL no rst\n");
            return 1;
        }
        if (h.op == VS_OP_RST)
            break;
    }
    vs_print("rst", &h);
    printf("PASS\n");
    return 0;
}

int main(const struct bh_bootinfo *bi) {
    if (vs_setup(bi) != 0)
        return 1;
    uint64_t mode = vio_cmdline_u64(bi, "vsock_mode", 1);
    uint32_t port = (uint32_t)vio_cmdline_u64(bi, "vsock_port", 1234);
    if (mode == 2)
        return connect_mode(port, vio_cmdline_u64(bi, "seed", 1));
    return listen_mode(port);
}
