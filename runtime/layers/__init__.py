"""Model building blocks. Layers hold packed weights and take flat, batch-wide tensors."""
