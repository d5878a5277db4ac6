"""zeropur_export: build-time toolchain (needs torch)."""
