"""Low-memory readers and streaming writers for tensor files (safetensors and ``torch.save`` archives)."""
