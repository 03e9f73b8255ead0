/*
 * Minimal KVM runner for the Linux 64-bit boot protocol entry of a guest ELF or bzImage (tests only).
 *
 * QEMU boots ELF guests only through PVH, so this harness is the reference for the other entry:
 * it loads the ELF's PT_LOAD segments (bzImage: the protected-mode part at 0x100000, entry +0x200,
 * setup header copied into boot_params), builds a GDT (0x500), identity page tables for 1 GiB
 * (PML4 0x9000), a boot_params zero page (0x7000) with a two-entry e820 map and the command line
 * (0x20000), enters long mode at e_entry with RSI = 0x7000, and emulates just COM1 (THR/LSR) and
 * the debug-exit port 0xf4. No irqchip, no MP table.
 *
 * Usage: linux64_harness ELF CMDLINE [MEM_MIB=64]
 * Exit: (code << 1) | 1 after a debug-exit write; 4 HLT; 5 shutdown (triple fault); 6 internal error;
 *       1 harness error.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: linux64_harness ELF CMDLINE [MEM_MIB]\n");
        return 1;
    }
    uint64_t mem_size = (uint64_t)(argc > 3 ? strtoul(argv[3], NULL, 0) : 64) << 20;
    if (mem_size < (4u << 20) || mem_size > (1u << 30)) {
        fprintf(stderr, "memory must be 4..1024 MiB\n");
        return 1;
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        die("open ELF");
    uint8_t *elf = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (elf == MAP_FAILED)
        die("mmap image");
    uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    uint8_t *bp = mem + 0x7000;
    uint64_t entry, phoff;
    uint16_t phnum = 0;
    if (st.st_size > 0x1000 && memcmp(elf + 0x202, "HdrS", 4) == 0) {
        uint64_t pm = ((uint64_t)elf[0x1f1] + 1) * 512;
        uint32_t init_size;
        memcpy(&init_size, elf + 0x260, 4);
        if (pm >= (uint64_t)st.st_size || init_size > mem_size - 0x100000 ||
            (uint64_t)st.st_size - pm > init_size) {
            fprintf(stderr, "bzImage does not fit\n");
            return 1;
        }
        memcpy(mem + 0x100000, elf + pm, (size_t)((uint64_t)st.st_size - pm));
        memcpy(bp + 0x1f1, elf + 0x1f1, 0x268 - 0x1f1);
        entry = 0x100200;
    } else if (st.st_size < 64 || memcmp(elf, "\x7f" "ELF\x02\x01", 6) != 0) {
        fprintf(stderr, "neither an ELF64 file nor a bzImage\n");
        return 1;
    } else {
        memcpy(&entry, elf + 0x18, 8);
        memcpy(&phoff, elf + 0x20, 8);
        memcpy(&phnum, elf + 0x38, 2);
        if (phoff > (uint64_t)st.st_size || (uint64_t)phnum * 56 > (uint64_t)st.st_size - phoff) {
            fprintf(stderr, "bad program header table\n");
            return 1;
        }
    }
    for (unsigned i = 0; i < phnum; i++) {
        const uint8_t *ph = elf + phoff + 56 * i;
        uint32_t type;
        uint64_t off, paddr, filesz, memsz;
        memcpy(&type, ph, 4);
        memcpy(&off, ph + 8, 8);
        memcpy(&paddr, ph + 24, 8);
        memcpy(&filesz, ph + 32, 8);
        memcpy(&memsz, ph + 40, 8);
        if (type != 1)
            continue;
        if (paddr < 0x100000 || memsz > mem_size || paddr > mem_size - memsz || filesz > memsz ||
            off + filesz > (uint64_t)st.st_size) {
            fprintf(stderr, "segment does not fit\n");
            return 1;
        }
        memcpy(mem + paddr, elf + off, filesz);
    }
    uint64_t gdt[4] = {0, 0x00cf9b000000ffffULL, 0x00af9b000000ffffULL, 0x00cf93000000ffffULL};
    memcpy(mem + 0x500, gdt, sizeof gdt);
    uint64_t *pml4 = (uint64_t *)(mem + 0x9000), *pdpt = (uint64_t *)(mem + 0xa000),
             *pd = (uint64_t *)(mem + 0xb000);
    pml4[0] = 0xa000 | 3;
    pdpt[0] = 0xb000 | 3;
    for (uint64_t i = 0; i < 512; i++)
        pd[i] = (i << 21) | 0x83;
    uint32_t cmd_ptr = 0x20000;
    memcpy(bp + 0x228, &cmd_ptr, 4);
    strncpy((char *)mem + 0x20000, argv[2], 0xffff);
    struct { uint64_t addr, size; uint32_t type; } __attribute__((packed)) e820[2] = {
        {0, 0x9fc00, 1}, {0x100000, mem_size - 0x100000, 1}};
    memcpy(bp + 0x2d0, e820, sizeof e820);
    bp[0x1e8] = 2;

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .memory_size = mem_size, .userspace_addr = (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + 256 * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = 256;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0 || ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
        die("CPUID");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    struct kvm_sregs s;
    if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0)
        die("KVM_GET_SREGS");
    struct kvm_segment code = {.base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 11, .present = 1,
                               .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1};
    struct kvm_segment data = {.base = 0, .limit = 0xffffffff, .selector = 0x18, .type = 3, .present = 1,
                               .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1};
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.gdt.base = 0x500;
    s.gdt.limit = sizeof gdt - 1;
    s.cr0 = 0x80000011;
    s.cr3 = 0x9000;
    s.cr4 = 0x20;
    s.efer = 0x500;
    if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs r = {.rip = entry, .rsi = 0x7000, .rsp = 0x8ff0, .rflags = 2};
    if (ioctl(vcpu, KVM_SET_REGS, &r) < 0)
        die("KVM_SET_REGS");
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint32_t value = 0;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                memcpy(&value, data, run->io.size);
                if (run->io.port == 0x3f8) {
                    putchar(value & 0xff);
                } else if (run->io.port == 0xf4) {
                    fflush(stdout);
                    return (int)(((value << 1) | 1) & 0xff);
                }
            } else {
                value = run->io.port == 0x3fd ? 0x60 : 0xffffffffU;
                memcpy(data, &value, run->io.size);
            }
            break;
        }
        case KVM_EXIT_MMIO:
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0xff, sizeof run->mmio.data);
            break;
        case KVM_EXIT_HLT:
            fflush(stdout);
            return 4;
        case KVM_EXIT_SHUTDOWN:
            fflush(stdout);
            return 5;
        default:
            fflush(stdout);
            fprintf(stderr, "exit reason %u (internal suberror %u)\n", run->exit_reason,
                    run->internal.suberror);
            return 6;
        }
    }
}
