/*
 * bulkhead guest entry code. Linked at physical 0x100000 (guest.ld); the first bytes of the image are:
 *   +0x000  _start32_linux  Linux 32-bit boot protocol (code32_start): ESI = boot_params, paging off
 *   +0x200  _start64        Linux 64-bit boot protocol (ELF e_entry):   RSI = boot_params, long mode
 *   _start_pvh              PVH (ELF note Xen/18): EBX = hvm_start_info, paging off
 * Each entry loads the image's own GDT and identity page tables (0..4 GiB, 2 MiB pages, static data),
 * so nothing the boot loader built below 1 MiB stays in use, then calls bh_start(protocol, info).
 * Also holds the AP trampoline, copied by lib/smp.c to BH_TRAMPOLINE_ADDR (0x70000).
 */
#define BOOT_LINUX64 1
#define BOOT_LINUX32 2
#define BOOT_PVH 3
#define SEL_CODE64 0x08
#define SEL_DATA 0x10
#define SEL_CODE32 0x18
#define TRAMPOLINE_ADDR 0x70000
#define MSR_EFER 0xc0000080

    .section .text.head, "ax"
    .code32
    .globl _start32_linux
_start32_linux:
    cli
    movl %esi, %edi
    movl $BOOT_LINUX32, %ebp
    jmp enter_long_mode

    .globl _start_pvh
_start_pvh:
    cli
    movl %ebx, %edi
    movl $BOOT_PVH, %ebp
enter_long_mode:
    lgdt gdt_ptr
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    ljmp $SEL_CODE64, $common64

    .org 0x200
    .code64
    .globl _start64
_start64:
    cli
    movl %esi, %edi                 /* boot_params lives below 4 GiB */
    movl $BOOT_LINUX64, %ebp
    lgdt gdt_ptr(%rip)
    movq $pml4, %rax
    movq %rax, %cr3
    pushq $SEL_CODE64
    pushq $common64
    lretq

common64:
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl %edi, %r12d                /* zero-extends: upper halves are undefined after 32-bit code */
    movl %ebp, %r13d
    movq $bsp_stack_top, %rsp
    xorl %ebp, %ebp
    /* zero .bss (small: stacks live in .stack, which is not cleared) */
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    cld
    rep stosq
    movl %r13d, %edi
    movq %r12, %rsi
    call bh_start
3:  cli
    hlt
    jmp 3b

/* ---- AP path: the trampoline below runs at TRAMPOLINE_ADDR in real mode, then jumps here. ---- */
    .globl bh_ap_entry64
bh_ap_entry64:
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movq bh_ap_stack_top(%rip), %rsp
    xorl %ebp, %ebp
    call bh_ap_main
4:  cli
    hlt
    jmp 4b

    .section .rodata.trampoline, "a"
    .code16
    .globl bh_trampoline_start, bh_trampoline_end
bh_trampoline_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (tramp_gdt_ptr - bh_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $(TRAMPOLINE_ADDR + (tramp32 - bh_trampoline_start))
    .code32
tramp32:
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmp $SEL_CODE64, $bh_ap_entry64
    .balign 8
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
bh_trampoline_end:

/* ---- PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY = 18), desc = 32-bit physical entry (8 bytes, LE) ---- */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz ("Xen\0") */
    .long 8                         /* descsz */
    .long 18                        /* type */
    .asciz "Xen"
    .balign 4
    .quad _start_pvh

/* ---- GDT and identity page tables (static: no ring-0 time spent building them) ---- */
    .section .data.boot, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
    .quad 0x00cf9a000000ffff        /* 0x18: 32-bit code (AP trampoline) */
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 4096
pml4:
    .quad pdpt + 0x03
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x03
    .quad pd + 0x1000 + 0x03
    .quad pd + 0x2000 + 0x03
    .quad pd + 0x3000 + 0x03
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .if i < 1536
    .quad (i << 21) | 0x83          /* present, writable, 2 MiB, write-back */
    .else
    .quad (i << 21) | 0x9b          /* 3..4 GiB (MMIO hole, LAPIC): + PCD | PWT */
    .endif
    .set i, i + 1
    .endr

    .section .stack, "aw", @nobits
    .balign 16
    .space 16384
    .globl bsp_stack_top
bsp_stack_top:
