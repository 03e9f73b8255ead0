"""The runtime: turns a VmConfig into a running VM (vCPU threads, I/O thread, devices)."""
