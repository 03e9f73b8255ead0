/* ACPI discovery as a kernel does it: RSDP from the boot info (hvm_start_info.rsdp_paddr or
 * boot_params.acpi_rsdp_addr), else a scan of 0xe0000..0xfffff; then XSDT, FADT, MADT, DSDT.
 * Lines: RSDP, TABLE (one per XSDT entry), FADT, MADT, DSDT, VIRTIO (one per LNRO0005 device: its
 * _CRS memory window and interrupt), PASS/FAIL. Format: README.md. */
#include "rt.h"

static unsigned count_in(u64 addr, u32 len, const char *needle, unsigned n) {
    unsigned c = 0;
    for (u32 i = 0; i + n <= len; i++)
        if (!ustrncmp((const char *)(addr + i), needle, n))
            c++;
    return c;
}

/* For each LNRO0005 _HID in the DSDT, the Memory32Fixed (0x86) and Extended Interrupt (0x89)
 * descriptors of the _CRS that follows it (within 96 bytes). */
static void virtio_devices(u64 dsdt, u32 len) {
    for (u32 i = 0; i + 8 <= len; i++) {
        if (ustrncmp((const char *)(dsdt + i), "LNRO0005", 8))
            continue;
        u64 base = 0, size = 0, irq = ~0ul;
        for (u32 j = i + 8; j + 9 <= len && j < i + 96; j++) {
            const u8 *p = (const u8 *)(dsdt + j);
            if (p[0] == 0x86 && p[1] == 9 && p[2] == 0 && !size) {
                base = *(const u32 *)(p + 4);
                size = *(const u32 *)(p + 8);
            } else if (p[0] == 0x89 && p[3] >= 1 && irq == ~0ul && size) {
                irq = *(const u32 *)(p + 5);
                break;
            }
        }
        puts_("VIRTIO");
        kv("base", base);
        kv("size", size);
        kvd("irq", irq);
        nl();
    }
}

static void sig(u64 t) {
    char s[5] = {0};
    umemcpy(s, (void *)t, 4);
    puts_(s);
}

int payload_main(void) {
    u64 rsdp = find_rsdp();
    puts_("RSDP");
    kv("addr", rsdp);
    puts_(" via=");
    puts_(rsdp_via);
    if (!rsdp) {
        nl();
        puts_("FAIL no RSDP");
        nl();
        return 1;
    }
    u8 rev = *(u8 *)(rsdp + 15);
    kvd("rev", rev);
    kvd("sum20_ok", acpi_sum_ok(rsdp, 20));
    kvd("sum36_ok", rev >= 2 ? acpi_sum_ok(rsdp, 36) : 1);
    kv("rsdt", *(u32 *)(rsdp + 16));
    kv("xsdt", rev >= 2 ? *(u64 *)(rsdp + 24) : 0);
    nl();
    int bad = 0;
    for (unsigned i = 0; i < 64; i++) {
        u64 t = acpi_root_entry(rsdp, i);
        if (!t)
            break;
        u32 len = *(u32 *)(t + 4);
        puts_("TABLE ");
        sig(t);
        kv("addr", t);
        kvd("len", len);
        kvd("rev", *(u8 *)(t + 8));
        kvd("sum_ok", acpi_sum_ok(t, len));
        nl();
        bad |= !acpi_sum_ok(t, len);
    }
    u64 fadt = acpi_find(rsdp, "FACP");
    u64 dsdt = 0;
    if (fadt) {
        u32 len = *(u32 *)(fadt + 4);
        u32 flags = len >= 116 ? *(u32 *)(fadt + 112) : 0;
        dsdt = len >= 148 ? *(u64 *)(fadt + 140) : 0;
        if (!dsdt)
            dsdt = *(u32 *)(fadt + 40);
        puts_("FADT");
        kv("flags", flags);
        kvd("hw_reduced", (flags >> 20) & 1);
        kv("dsdt", dsdt);
        nl();
    }
    u64 madt = acpi_find(rsdp, "APIC");
    if (madt) {
        u8 ids[64];
        unsigned ioapics;
        unsigned n = madt_apic_ids(madt, ids, 64, &ioapics);
        puts_("MADT");
        kv("lapic_addr", *(u32 *)(madt + 36));
        kvd("lapics", n);
        kvd("ioapics", ioapics);
        nl();
    }
    if (dsdt) {
        u32 len = *(u32 *)(dsdt + 4);
        puts_("DSDT");
        kvd("len", len);
        kvd("sum_ok", acpi_sum_ok(dsdt, len));
        kvd("lnro0005", count_in(dsdt, len, "LNRO0005", 8));
        nl();
        virtio_devices(dsdt, len);
        bad |= !acpi_sum_ok(dsdt, len);
    }
    if (bad || !fadt || !madt || !dsdt) {
        puts_("FAIL");
        nl();
        return 1;
    }
    puts_("PASS");
    nl();
    return 0;
}
