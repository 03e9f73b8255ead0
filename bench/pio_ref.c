/*
 * C reference loop for the port-I/O exit benchmark: the smallest possible KVM VMM.
 *
 * Creates a VM with 64 KiB of RAM, copies a 16-bit real-mode blob to 0x1000 that executes
 * `count` `out dx, al` instructions to `port` and then `hlt`, and runs KVM_RUN, handling every
 * KVM_EXIT_IO in userspace (counting it, nothing else) until KVM_EXIT_HLT.
 *
 * Build: gcc -O2 -o pio_ref bench/pio_ref.c
 * Usage: pio_ref [count=200000] [port=0x80]
 * Output (one line): pio_ref exits=<n> seconds=<s> exits_per_s=<r>
 * Exit status: 0 on success, 1 on any failure (message on stderr).
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define CODE_ADDR 0x1000

static void die(const char *what) {
    perror(what);
    exit(1);
}

int main(int argc, char **argv) {
    unsigned long count = argc > 1 ? strtoul(argv[1], NULL, 0) : 200000;
    unsigned long port = argc > 2 ? strtoul(argv[2], NULL, 0) : 0x80;
    if (count == 0 || count > 0xffffffffUL || port > 0xffff) {
        fprintf(stderr, "usage: pio_ref [count 1..2^32-1] [port 0..0xffff]\n");
        return 1;
    }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
        fprintf(stderr, "unexpected KVM API version\n");
        return 1;
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    /* 16-bit code: mov ecx, count; mov dx, port; xor al, al; 1: out dx, al; dec ecx; jnz 1b; hlt */
    uint8_t code[] = {
        0x66, 0xb9, 0, 0, 0, 0,    /* mov ecx, imm32 */
        0xba, 0, 0,                /* mov dx, imm16 */
        0x30, 0xc0,                /* xor al, al */
        0xee,                      /* out dx, al */
        0x66, 0x49,                /* dec ecx */
        0x75, 0xfb,                /* jnz -5 (to out) */
        0xf4,                      /* hlt */
    };
    uint32_t c32 = (uint32_t)count;
    memcpy(code + 2, &c32, 4);
    code[7] = (uint8_t)port;
    code[8] = (uint8_t)(port >> 8);
    memcpy(mem + CODE_ADDR, code, sizeof code);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = CODE_ADDR, .rflags = 0x2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    unsigned long exits = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        if (run->exit_reason == KVM_EXIT_IO) {
            if (run->io.direction != KVM_EXIT_IO_OUT || run->io.port != port) {
                fprintf(stderr, "unexpected I/O exit: port 0x%x\n", run->io.port);
                return 1;
            }
            exits++;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_HLT)
            break;
        fprintf(stderr, "unexpected exit reason %u\n", run->exit_reason);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("pio_ref exits=%lu seconds=%.6f exits_per_s=%.0f\n", exits, secs, secs > 0 ? exits / secs : 0.0);
    return exits == count ? 0 : 1;
}
