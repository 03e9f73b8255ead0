/* The boot information a kernel reads at entry: hvm_start_info (PVH, EBX) or boot_params (Linux,
 * ESI/RSI): command line, memory map, ACPI RSDP pointer.
 * Lines: BOOT, CMDLINE, MAP (one per entry), MAP_SUMMARY, RSDP, PASS. Format: README.md. */
#include "rt.h"

int payload_main(void) {
    u64 info = boot_info();
    u32 proto = entry_state[ES_PROTO];
    puts_("BOOT");
    puts_(proto == 1 ? " proto=pvh" : proto == 2 ? " proto=linux64" : " proto=linux32");
    kv("info", info);
    if (proto == 1)
        kvd("magic_ok", *(volatile u32 *)info == 0x336ec578);
    else
        kvd("hdrs_ok", *(volatile u32 *)(info + 0x202) == 0x53726448);
    nl();
    puts_("CMDLINE ");
    puts_(cmdline());
    nl();
    u64 map;
    unsigned n, stride;
    if (proto == 1) {
        map = *(volatile u64 *)(info + 40);
        n = *(volatile u32 *)(info + 48);
        stride = 24;
    } else {
        map = info + 0x2d0;
        n = *(volatile u8 *)(info + 0x1e8);
        stride = 20;
    }
    u64 usable = 0, high = 0;
    for (unsigned i = 0; i < n && i < 128; i++) {
        u64 base = *(u64 *)(map + i * stride), size = *(u64 *)(map + i * stride + 8);
        u32 type = *(u32 *)(map + i * stride + 16);
        puts_("MAP");
        kv("base", base);
        kv("size", size);
        kvd("type", type);
        nl();
        if (type == 1) {
            usable += size;
            if (base >= 0x100000)
                high += size;
        }
    }
    puts_("MAP_SUMMARY");
    kvd("entries", n);
    kv("usable", usable);
    kv("usable_above_1m", high);
    nl();
    u64 rsdp = find_rsdp();
    puts_("RSDP");
    kv("addr", rsdp);
    puts_(" via=");
    puts_(rsdp_via);
    nl();
    puts_("PASS");
    nl();
    return 0;
}
