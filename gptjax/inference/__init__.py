"""Decoding and serving: sampling and beam search over one KV cache, text completion, the HTTP server."""
