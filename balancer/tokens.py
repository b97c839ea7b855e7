"""Prompt size: extracted from any request shape, counted with the model's tokenizer.

The tokenizer (transformers, from the *local* model folder, never a hub) loads off the event
loop at startup; long prompts are tokenized in a worker thread, so a 16k-token prompt never
stalls the streams being relayed. Without a tokenizer we estimate ~4 characters per token,
which is good enough for the work-aware policy but never used to refuse a request.

Tokenizing is the one piece of work a client can make the balancer do in proportion to its
prompt, so it is bounded before it starts: no prompt longer than ``max_input_tokens`` x the
longest token of the vocabulary (in characters) is tokenized — such a prompt has more than
``max_input_tokens`` tokens whatever it says, and is refused at once — and at most
``concurrency`` prompts are tokenized at a time (the others wait their turn).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("neuron_fleet.tokens")

CHARS_PER_TOKEN = 4
INLINE_CHARS = 2_000
"""Prompts shorter than this are tokenized on the loop (well under a millisecond)."""
CHAT_TOKENS_PER_MESSAGE = 4
"""Chat-template overhead per message (role markers), added to the content's tokens."""


def prompt_text(body: dict[str, Any]) -> str:
    """The text a replica will prefill, from a TGI, OpenAI chat or completion body."""
    if isinstance(body.get("inputs"), str):
        return body["inputs"]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "".join(p for p in prompt if isinstance(p, str))
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(
                    c["text"]
                    for c in content
                    if isinstance(c, dict) and isinstance(c.get("text"), str)
                )
        return "\n".join(parts)
    return ""


def message_count(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    return len(messages) if isinstance(messages, list) else 0


def requested_new_tokens(body: dict[str, Any]) -> Any:
    """``max_new_tokens`` (TGI) or ``max_tokens`` / ``max_completion_tokens`` (OpenAI)."""
    params = body.get("parameters")
    if isinstance(params, dict) and "max_new_tokens" in params:
        return params["max_new_tokens"]
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body:
            return body[key]
    return None


def has_tokenizer_files(folder: str | Path) -> bool:
    path = Path(folder)
    return path.is_dir() and any(
        (path / name).exists()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


class PromptTooLong(Exception):
    """More characters than ``max_input_tokens`` tokens can cover: refused untokenized."""

    def __init__(self, chars: int, max_chars: int) -> None:
        super().__init__(f"{chars} characters > {max_chars}")
        self.chars = chars
        self.max_chars = max_chars


class TokenCounter:
    def __init__(
        self,
        tokenizer_path: str | None = None,
        max_input_tokens: int | None = None,
        concurrency: int = 1,
    ) -> None:
        self.tokenizer_path = tokenizer_path
        self.max_input_tokens = max_input_tokens
        self._tokenizer: Any = None
        self.max_chars: int | None = None
        """Longest prompt (characters) worth tokenizing; set once the tokenizer loads."""
        self._workers = asyncio.Semaphore(max(1, concurrency))

    @property
    def exact(self) -> bool:
        """True once a real tokenizer is loaded (only then may we refuse long prompts)."""
        return self._tokenizer is not None

    async def load(self) -> None:
        """Load the tokenizer in a thread; on failure keep estimating and say why, once."""
        if not self.tokenizer_path:
            return
        if not has_tokenizer_files(self.tokenizer_path):
            log.warning(
                "no tokenizer files in %s: prompt tokens are estimated (%d chars/token)",
                self.tokenizer_path,
                CHARS_PER_TOKEN,
            )
            return
        try:
            tokenizer, longest = await asyncio.to_thread(_load_tokenizer, self.tokenizer_path)
            if self.max_input_tokens:
                self.max_chars = self.max_input_tokens * longest
            self._tokenizer = tokenizer
            log.info(
                "tokenizer loaded from %s (longest token %d characters; prompts over %s "
                "characters are refused untokenized)",
                self.tokenizer_path,
                longest,
                self.max_chars if self.max_chars is not None else "no limit of",
            )
        except Exception as exc:
            log.warning(
                "could not load the tokenizer from %s (%s): prompt tokens are estimated",
                self.tokenizer_path,
                exc,
            )

    def estimate(self, text: str) -> int:
        return len(text) // CHARS_PER_TOKEN + 1 if text else 0

    async def count(self, text: str) -> int:
        """Tokens in ``text``; raises PromptTooLong without tokenizing when it is over
        ``max_chars``."""
        if self._tokenizer is None or not text:
            return self.estimate(text)
        if self.max_chars is not None and len(text) > self.max_chars:
            raise PromptTooLong(len(text), self.max_chars)
        if len(text) < INLINE_CHARS:
            return self._count_now(text)
        async with self._workers:
            return await asyncio.to_thread(self._count_now, text)

    def _count_now(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    async def count_request(self, body: dict[str, Any]) -> int:
        tokens = await self.count(prompt_text(body))
        return tokens + CHAT_TOKENS_PER_MESSAGE * message_count(body)


def _load_tokenizer(path: str) -> tuple[Any, int]:
    """The tokenizer and its longest token in characters.

    A vocabulary entry is at least as long as the text it stands for: byte-level BPE writes
    one character per byte (GPT-2's bytes_to_unicode), SentencePiece one ``▁`` per space
    and ``<0xNN>`` per fallback byte, WordPiece adds ``##``; added tokens (``<|eot_id|>``)
    are in ``get_vocab()`` as written. (transformers 4.57.6,
    ``PreTrainedTokenizerFast.get_vocab``: base vocabulary plus added tokens.) A normalizer
    that drops or merges characters (NFKC, stripped whitespace) is the exception: such
    text could hold fewer tokens than the bound assumes, and is refused all the same.
    """
    tokenizer = _open_tokenizer(path)
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return tokenizer, max(1, longest)


def _open_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer  # heavy import: only when a tokenizer is configured

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError) as exc:
        # A folder saved by transformers 5 names tokenizer_class "TokenizersBackend", which
        # 4.57 does not know ("Tokenizer class TokenizersBackend does not exist"); its
        # tokenizer.json is still the tokenizers library's own format.
        tokenizer_json = Path(path) / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise
        log.info("AutoTokenizer cannot load %s (%s): reading tokenizer.json directly", path, exc)
        return _TokenizersBackend(str(tokenizer_json))


class _TokenizersBackend:
    """tokenizer.json through the ``tokenizers`` library, called like a transformers
    tokenizer (``tok(text, add_special_tokens=True)["input_ids"]``); its post-processor adds
    the special tokens (BOS) as the model's own tokenizer would."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(tokenizer_json)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {
            "input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        }
