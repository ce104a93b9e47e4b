"""Token counting, offline (``bpe-openai`` ships the o200k vocabulary inside its wheel).

Tollway bills from the upstream's reported usage. Counting locally is only for two things:
estimating a prompt to size its hold (a cheap byte-based estimate; a short estimate is safe
because settlement takes any excess from the balance), and counting what was delivered when a
stream ended without usage (the tokenizer; the record is marked ``estimated``).
"""

from __future__ import annotations

import functools
import json
import warnings
from typing import Any

#: OpenAI's chat accounting: a few tokens of framing per message and per reply.
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING = 3
#: What one image part costs at most before the upstream says otherwise (a 512px tile at high
#: detail is 170 + 85); used only for estimates.
TOKENS_PER_IMAGE = 765


@functools.cache
def _encoding() -> Any:
    with warnings.catch_warnings():  # bpe-openai uses importlib.resources.open_binary
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai

        return bpe_openai.get_encoding("o200k_base")


def warm_up() -> None:
    """Load the vocabulary (about a second, ~135 MiB of RSS) before the first request needs
    it. The gateway does so at start only when a sandbox provider (which counts every request)
    is in the catalog; otherwise the first count loads it: a worker whose upstreams always
    report usage never holds it (the hold's estimate, :func:`estimate_prompt`, needs none)."""
    _encoding()


#: bpe-openai refuses a text of 1,000,000 characters or more ("too long to encode safely");
#: longer texts (a huge prompt, a long delivered stream) are counted in pieces of this size.
#: A piece boundary may split one token into two: an estimate, off by at most one per piece.
COUNT_PIECE_CHARS = 200_000


def count(text: str) -> int:
    encoding = _encoding()
    return sum(len(encoding.encode_ordinary(text[start:start + COUNT_PIECE_CHARS]))
               for start in range(0, len(text), COUNT_PIECE_CHARS))


def prompt_parts(payload: dict[str, Any]) -> tuple[list[str], int]:
    """The texts a request sends as its prompt, and how many images."""
    texts: list[str] = []
    images = 0
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        texts.append(part["text"])
                    elif isinstance(part, dict) and part.get("type") in ("image_url", "image"):
                        images += 1
            for key in ("name", "tool_calls", "function_call"):
                if key in message:
                    texts.append(json.dumps(message[key]) if not isinstance(message[key], str)
                                 else message[key])
    for key in ("prompt", "input", "system", "instructions"):
        value = payload.get(key)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, str):
                    texts.append(v)
                elif isinstance(v, dict) and v.get("type") == "text" and isinstance(
                        v.get("text"), str):
                    texts.append(v["text"])  # an Anthropic system block
                else:
                    texts.append(json.dumps(v))
    for key in ("tools", "functions"):
        if key in payload:
            texts.append(json.dumps(payload[key]))
    return texts, images


def _framing(payload: dict[str, Any]) -> int:
    messages = payload.get("messages")
    if isinstance(messages, list):
        return TOKENS_PER_MESSAGE * len(messages) + REPLY_PRIMING
    return 0


def count_prompt(payload: dict[str, Any]) -> int:
    """The prompt's tokens counted with the tokenizer (for estimated usage)."""
    texts, images = prompt_parts(payload)
    return sum(count(t) for t in texts) + images * TOKENS_PER_IMAGE + _framing(payload)


def estimate_prompt(payload: dict[str, Any]) -> int:
    """A fast estimate to size a hold: about 3 bytes a token for mixed text."""
    texts, images = prompt_parts(payload)
    size = sum(len(t.encode()) for t in texts)
    return -(-size // 3) + images * TOKENS_PER_IMAGE + _framing(payload)
