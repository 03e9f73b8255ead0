/* Prints the CPU state the VMM handed over at entry (recorded by crt.S) and a few registers the
 * VMM sets for every vCPU (MCG_CAP, APIC base). MXCSR and the x87 control word are read by ring3.c:
 * stmxcsr/fnstcw in ring 0 are emulated by KVM on PVM hosts and fail there (emulation failure), as do
 * LAR/LSL, so segment attributes are not read back. Format:
 *   ENTRY proto=<1 pvh|2 linux64|3 linux32> key=value ...   one line per group
 *   PASS */
#include "rt.h"

static const char *const names[ES_SLOTS] = {
    "proto", "eax", "ebx", "esi", "esp", "cr0", "cr3", "cr4", "eflags", "efer", "cs", "ds", "es", "ss",
    "fs", "gs", "tr", "gdt_limit", "gdt_base", "idt_limit", "idt_base", 0, 0, 0,
    0, 0, 0, 0, 0, 0, "rsi_hi", 0,
};

int payload_main(void) {
    for (int i = 0; i < ES_SLOTS; i++) {
        if (!names[i])
            continue;
        puts_("ENTRY");
        kv(names[i], entry_state[i]);
        nl();
    }
    puts_("REG");
    kv("mcg_cap", rdmsr(0x179));
    nl();
    puts_("REG");
    kv("apic_base", rdmsr(0x1b));
    nl();
    puts_("PASS");
    nl();
    return 0;
}
