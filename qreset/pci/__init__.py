"""Host PCI access: addresses, config-space decoding, sysfs and the simulated host."""
