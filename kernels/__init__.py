"""kernels: filled by its own issue."""
