"""Freestanding guest payloads shipped with bulkhead (the demo guest) and their builder.

Sources: lib/ (entry code, linker script, tiny C library), demo.c. Build with
`bulkhead.guests.build.build(program, fmt)`; kept import-free so `bulkhead run` stays lean.
"""

__all__: list[str] = []
