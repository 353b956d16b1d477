"""The vLLM simulator behind `extproc sim`: a product of its own, not a mock.

``engine`` (continuous batching on a virtual clock), ``kvcache`` (blocks with chained hashes, LRU
eviction), ``tokens`` (the chat template and token counting), ``api`` (vLLM's OpenAI server, errors and
faults), ``metrics`` (vLLM's metric names), ``config`` (presets), ``run`` and ``cli`` (`extproc sim`).
"""
