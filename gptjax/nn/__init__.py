"""The network: layers, attention (masks, XLA path, kernels), the GPT model, parameter layouts, HF interop."""
