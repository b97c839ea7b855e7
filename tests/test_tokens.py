"""The balancer's prompt-token counter on model folders as users have them."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from balancer.tokens import TokenCounter
from tests.helpers_tokenizer import build_tiny_tokenizer

TEXT = "What is deep learning? The neuron core streams tokens across a static batch."


async def test_a_transformers_5_folder_is_counted_exactly(tmp_path: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", unknown to the pinned 4.57:
    the counter reads tokenizer.json with the tokenizers library instead of estimating."""
    folder = build_tiny_tokenizer(tmp_path / "model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    counter = TokenCounter(str(folder))
    await counter.load()
    assert counter.exact
    expected = len(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT).ids)
    assert await counter.count(TEXT) == expected
    assert await counter.count(TEXT * 100) == len(  # the worker-thread path too
        Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT * 100).ids
    )


async def test_a_folder_without_tokenizer_json_still_estimates(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Nope"}))
    counter = TokenCounter(str(folder))
    await counter.load()
    assert not counter.exact and await counter.count("abcdefgh") == 3
