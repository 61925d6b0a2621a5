"""The network: layers, masks, attention and its kernels, the GPT model, parameter layouts,
HF interop."""
