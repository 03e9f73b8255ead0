/*
 * Entry code of the conformance payloads (see rt.h). Layout of .text, which GNU ld's default script
 * places first at -Ttext (0x100000 when given):
 *   +0x000 _start32   Linux 32-bit boot protocol (bzImage code32_start): ESI = boot_params, paging off
 *   +0x200 _start     Linux 64-bit boot protocol (ELF e_entry, bzImage +0x200): RSI = boot_params
 *          _start_pvh PVH (ELF note Xen/18, unless built with -DNO_PVH_NOTE): EBX = hvm_start_info
 * Each entry first records the CPU state it was handed into entry_state[] (rt.h), then loads its own
 * GDT and identity page tables (0..4 GiB, 2 MiB pages, user-accessible) and calls payload_main().
 */
#include "rt.h"
#define ES(slot) entry_state+4*slot
#define MSR_EFER 0xc0000080
#define TRAMPOLINE_ADDR 0x70000

    .text
    .code32
    .globl _start32
_start32:
    movl %eax, ES(ES_EAX)
    movl $3, %eax
    jmp record32

    .globl _start_pvh
_start_pvh:
    movl %eax, ES(ES_EAX)
    movl $1, %eax
record32:
    movl %eax, ES(ES_PROTO)
    movl %ebx, ES(ES_EBX)
    movl %esi, ES(ES_ESI)
    movl %esp, ES(ES_ESP)
    movl %cr0, %eax
    movl %eax, ES(ES_CR0)
    movl %cr3, %eax
    movl %eax, ES(ES_CR3)
    movl %cr4, %eax
    movl %eax, ES(ES_CR4)
    xorl %eax, %eax
    movw %cs, %ax
    movl %eax, ES(ES_CS)
    movw %ds, %ax
    movl %eax, ES(ES_DS)
    movw %es, %ax
    movl %eax, ES(ES_ES)
    movw %ss, %ax
    movl %eax, ES(ES_SS)
    movw %fs, %ax
    movl %eax, ES(ES_FS)
    movw %gs, %ax
    movl %eax, ES(ES_GS)
    str %ax
    movl %eax, ES(ES_TR)
    sgdtl dtscratch
    movzwl dtscratch, %eax
    movl %eax, ES(ES_GDT_LIMIT)
    movl dtscratch + 2, %eax
    movl %eax, ES(ES_GDT_BASE)
    sidtl dtscratch
    movzwl dtscratch, %eax
    movl %eax, ES(ES_IDT_LIMIT)
    movl dtscratch + 2, %eax
    movl %eax, ES(ES_IDT_BASE)
    movl $bsp_stack_top, %esp
    pushfl
    popl %eax
    movl %eax, ES(ES_EFLAGS)
    movl $MSR_EFER, %ecx
    rdmsr
    movl %eax, ES(ES_EFER)
    /* long mode */
    lgdtl gdt64_ptr
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl %cr4, %eax
    orl $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
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
    ljmp $SEL_KCODE, $long64


    .org 0x200
    .code64
    .globl _start
_start:
    movl %eax, ES(ES_EAX)
    movl $2, %eax
    movl %eax, ES(ES_PROTO)
    movl %ebx, ES(ES_EBX)
    movl %esi, ES(ES_ESI)
    movq %rsi, %rax
    shrq $32, %rax
    movl %eax, ES(ES_RSI_HI)
    movl %esp, ES(ES_ESP)
    movq %cr0, %rax
    movl %eax, ES(ES_CR0)
    movq %cr3, %rax
    movl %eax, ES(ES_CR3)
    movq %cr4, %rax
    movl %eax, ES(ES_CR4)
    xorl %eax, %eax
    movw %cs, %ax
    movl %eax, ES(ES_CS)
    movw %ds, %ax
    movl %eax, ES(ES_DS)
    movw %es, %ax
    movl %eax, ES(ES_ES)
    movw %ss, %ax
    movl %eax, ES(ES_SS)
    movw %fs, %ax
    movl %eax, ES(ES_FS)
    movw %gs, %ax
    movl %eax, ES(ES_GS)
    str %ax
    movl %eax, ES(ES_TR)
    sgdtq dtscratch
    movzwl dtscratch, %eax
    movl %eax, ES(ES_GDT_LIMIT)
    movl dtscratch + 2, %eax
    movl %eax, ES(ES_GDT_BASE)
    sidtq dtscratch
    movzwl dtscratch, %eax
    movl %eax, ES(ES_IDT_LIMIT)
    movl dtscratch + 2, %eax
    movl %eax, ES(ES_IDT_BASE)
    movq $bsp_stack_top, %rsp
    pushfq
    popq %rax
    movl %eax, ES(ES_EFLAGS)
    movl $MSR_EFER, %ecx
    rdmsr
    movl %eax, ES(ES_EFER)
    lgdtq gdt64_ptr
    movq $pml4, %rax
    movq %rax, %cr3
    movq %cr4, %rax
    orq $0x600, %rax                /* OSFXSR | OSXMMEXCPT */
    movq %rax, %cr4
    pushq $SEL_KCODE
    pushq $long64
    lretq


long64:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movq $bsp_stack_top, %rsp
    call payload_main
    movl %eax, %edi
    call exit_

/* AP path: entered from the trampoline below in long mode */
    .globl ap_entry64
ap_entry64:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movq ap_stack_top(%rip), %rsp
    call ap_main
5:  cli
    hlt
    jmp 5b

/* Real-mode AP trampoline, copied to TRAMPOLINE_ADDR (SIPI vector 0x70) by the payload. */
    .section .rodata
    .code16
    .globl trampoline_start, trampoline_end
trampoline_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (tramp_gdt_ptr - trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $(TRAMPOLINE_ADDR + (tramp32 - trampoline_start))
    .code32
tramp32:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %cr4, %eax
    orl $0x620, %eax
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
    ljmp $SEL_KCODE, $ap_entry64
    .balign 8
tramp_gdt_ptr:
    .word gdt64_end - gdt64 - 1
    .long gdt64
trampoline_end:
    .code64

#ifndef NO_PVH_NOTE
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long _start_pvh
#endif

    .data
    .balign 16
    .globl gdt64
gdt64:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff        /* 0x10 kernel data */
    .quad 0x00cf9b000000ffff        /* 0x18 32-bit code (AP trampoline) */
    .quad 0x00cff3000000ffff        /* 0x20 user data (DPL 3): selector 0x23 */
    .quad 0x00affb000000ffff        /* 0x28 user code, 64-bit (DPL 3): selector 0x2b */
    .quad 0, 0                      /* 0x30 TSS (16 bytes), filled by payloads that build one */
gdt64_end:
    .balign 8
gdt64_ptr:
    .word gdt64_end - gdt64 - 1
    .quad gdt64
dtscratch:
    .quad 0, 0
    .balign 4
    .globl entry_state
entry_state:
    .fill ES_SLOTS, 4, 0

    .balign 4096
pml4:
    .quad pdpt + 0x07
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x07
    .quad pd + 0x1000 + 0x07
    .quad pd + 0x2000 + 0x07
    .quad pd + 0x3000 + 0x07
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .if i < 1536
    .quad (i << 21) | 0x87          /* present, writable, user, 2 MiB */
    .else
    .quad (i << 21) | 0x9f          /* 3..4 GiB (MMIO hole, LAPIC): + PCD | PWT */
    .endif
    .set i, i + 1
    .endr

    .bss
    .balign 16
    .space 16384
    .globl bsp_stack_top
bsp_stack_top:
    .section .note.GNU-stack, "", @progbits
