"""optim: filled by its own issue."""
