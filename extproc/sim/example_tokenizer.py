"""A small model directory to run the simulator and the picker on a real tokenizer without a download.

``write_example_tokenizer(dir)`` trains a byte-level BPE tokenizer (the `tokenizers` library, a few hundred
milliseconds) on English-like text and writes what a Hugging Face snapshot holds for it: ``tokenizer.json``
and a ``tokenizer_config.json`` with ``bos_token``, ``eos_token`` and a Llama-3-style chat template.
Tests and benchmarks give the directory to ``extproc sim --tokenizer`` and to ``precise_prefix``'s
``tokenizer`` param so both sides tokenize with the same files, as a vLLM pod and the picker would with the
model's. A real model directory works the same way.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from extproc.hf_tokenizer import INSTALL_HINT, TokenizerError

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_SYLLABLES = ["the", "an", "in", "on", "re", "st", "er", "ing", "ion", "al", "ed", "or", "at", "en", "ou", "it"]


def _corpus(lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "." for _ in range(lines)]


def write_example_tokenizer(directory: Path, vocab_size: int = 4096, seed: int = 0, corpus: Iterable[str] = ()) -> Path:
    """Train the tokenizer (on ``corpus`` too: a benchmark's text, so its words become tokens as a real model's
    vocabulary covers its language) and write the directory (created if needed); returns it."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError:
        raise TokenizerError(f"the example tokenizer needs the tokenizers package: {INSTALL_HINT}") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*_corpus(4000, seed), *corpus], trainer)
    bos = tokenizer.token_to_id(SPECIAL[0])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL[0]} $A", pair=f"{SPECIAL[0]} $A $B", special_tokens=[(SPECIAL[0], bos)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": SPECIAL[0], "eos_token": SPECIAL[4], "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
