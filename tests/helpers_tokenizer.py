"""A tiny tokenizer trained locally with ``tokenizers`` and saved as a folder that
``transformers.AutoTokenizer.from_pretrained`` loads offline (no Hub access, ever)."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "What is deep learning? Deep learning is a kind of machine learning.",
    "The neuron core streams tokens across a static batch of requests.",
    "Inferentia runs a compiled model with tensor parallel shards.",
    "Hello world, hello replica, hello balancer and hello supervisor.",
] * 20


def build_tiny_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """Train a byte-level BPE tokenizer and write tokenizer.json + tokenizer_config.json +
    config.json into ``folder``; return the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 16512,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "vocab_size": vocab_size})
    )
    return folder
