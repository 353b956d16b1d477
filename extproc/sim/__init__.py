"""The vLLM simulator behind `extproc sim`: a product of its own, not a mock.

``engine`` (continuous batching on a virtual clock), ``kvcache`` (blocks with chained hashes, LRU
eviction), ``tokens`` (the chat template, token counting and token ids), ``api`` (vLLM's OpenAI server,
tokenizer endpoints, errors and faults), ``render`` (the render endpoints' ``GenerateRequest``),
``metrics`` (vLLM's metric names), ``config`` (presets), ``run`` and ``cli`` (`extproc sim`).
"""
