"""lora: filled by its own issue."""
