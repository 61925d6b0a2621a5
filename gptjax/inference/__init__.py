"""Decoding and serving: `decoding` (prompts into a KV cache, one step at a time), `sampling`
(greedy/sampled decoding and `generate`), `beam_search`, `textgen` (text in, text out) and the
completions server `serving/`. Nothing here loads the training loop."""
