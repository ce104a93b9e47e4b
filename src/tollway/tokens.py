"""Token counting, offline (``bpe-openai`` ships the o200k vocabulary inside its wheel).

Tollway bills from the upstream's reported usage. Counting locally is only for two things:
estimating a prompt to size its hold (a cheap byte-based estimate; a short estimate is safe
because settlement takes any excess from the balance), and counting what was delivered when a
stream ended without usage (the tokenizer; the record is marked ``estimated``).
"""

from __future__ import annotations

import base64
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
    """The texts a request sends as its prompt, and the tokens of its other parts (images by
    their size, audio, files and documents by their data: :func:`part_tokens`)."""
    texts: list[str] = []
    extra = 0
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
                    if isinstance(part, dict):
                        extra += _content_part(part, texts)
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
    return texts, extra


#: Audio: OpenAI bills about 10 tokens a second; 1 token per 1,000 bytes covers audio
#: compressed down to 80 kbit/s (wav is 256 kbit/s and more).
AUDIO_BYTES_PER_TOKEN = 1000
#: A file or document (a PDF: text and page images) as the bytes of its data, 3 to a token.
FILE_BYTES_PER_TOKEN = 3
IMAGE_TYPES = ("image_url", "image", "input_image")
FILE_TYPES = ("file", "input_file", "document")


def _content_part(part: dict[str, Any], texts: list[str]) -> int:
    """One part of a message's content: its text goes to ``texts``; the tokens of anything
    else are returned."""
    kind = part.get("type")
    if isinstance(part.get("text"), str) and kind not in FILE_TYPES:
        texts.append(part["text"])
        return 0
    if kind in IMAGE_TYPES:
        return image_tokens(_data_of(part))
    if kind == "input_audio":
        audio = part.get("input_audio")
        data = audio.get("data") if isinstance(audio, dict) else None
        return -(-_decoded_size(data) // AUDIO_BYTES_PER_TOKEN) if isinstance(data, str) else 0
    if kind in FILE_TYPES:
        source = part.get("source")
        if isinstance(source, dict) and isinstance(source.get("data"), str) \
                and source.get("type") == "text":  # an Anthropic plain-text document
            texts.append(source["data"])
            return 0
        if isinstance(source, dict) and isinstance(source.get("content"), list):
            return sum(_content_part(p, texts) for p in source["content"]
                       if isinstance(p, dict))
        data = _data_of(part)
        return -(-_decoded_size(data) // FILE_BYTES_PER_TOKEN) if data else 0
    if isinstance(part.get("content"), list):  # an Anthropic tool_result
        return sum(_content_part(p, texts) for p in part["content"] if isinstance(p, dict))
    texts.append(json.dumps(part))  # a tool_use, or a part this version does not know
    return 0


def _data_of(part: dict[str, Any]) -> str | None:
    """The inline (base64 or data URL) data of an image, file or document part, if any."""
    for holder in (part, part.get("image_url"), part.get("file"), part.get("source")):
        if not isinstance(holder, dict):
            continue
        for key in ("url", "image_url", "file_data", "data"):
            value = holder.get(key)
            if isinstance(value, str) and (key != "url" or value.startswith("data:")):
                return value
    return None


def _decoded_size(data: str) -> int:
    """The bytes a base64 text (or data URL) decodes to."""
    body = data.split(",", 1)[1] if data.startswith("data:") else data
    return len(body) * 3 // 4


def _dimensions(data: str | None) -> tuple[int, int] | None:
    """Width and height from the header of an inline PNG, GIF or JPEG (None if unknown)."""
    if data is None:
        return None
    body = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        head = base64.b64decode(body[:65536] + "=" * (-len(body[:65536]) % 4))
    except ValueError:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head.startswith(b"\xff\xd8"):
        at = 2
        while at + 9 < len(head) and head[at] == 0xFF:
            marker, length = head[at + 1], int.from_bytes(head[at + 2:at + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2):
                return (int.from_bytes(head[at + 7:at + 9], "big"),
                        int.from_bytes(head[at + 5:at + 7], "big"))
            at += 2 + length
    return None


def image_tokens(data: str | None) -> int:
    """An image's tokens at most, by its size when its header says it: OpenAI's high-detail
    tiles (fit in 2048², shortest side 768, 170 per 512px tile + 85) or Anthropic's
    width × height / 750 (images are scaled to at most 1568px a side), whichever is more;
    :data:`TOKENS_PER_IMAGE` when the size is unknown (an image by URL)."""
    size = _dimensions(data)
    if size is None or min(size) <= 0:
        return TOKENS_PER_IMAGE
    width, height = size
    if max(width, height) > 2048:  # OpenAI: fit in 2048 x 2048, then shortest side 768
        width, height = width * 2048 // max(size), height * 2048 // max(size)
    if min(width, height) > 768:
        short = min(width, height)
        width, height = width * 768 // short, height * 768 // short
    tiles = -(-width // 512) * -(-height // 512)
    width, height = size
    if max(width, height) > 1568:  # Anthropic: at most 1568px a side
        width, height = width * 1568 // max(size), height * 1568 // max(size)
    anthropic = -(-width * height // 750)
    return max(85 + 170 * tiles, anthropic)


def _framing(payload: dict[str, Any]) -> int:
    messages = payload.get("messages")
    if isinstance(messages, list):
        return TOKENS_PER_MESSAGE * len(messages) + REPLY_PRIMING
    return 0


def count_prompt(payload: dict[str, Any]) -> int:
    """The prompt's tokens counted with the tokenizer (for estimated usage)."""
    texts, extra = prompt_parts(payload)
    return sum(count(t) for t in texts) + extra + _framing(payload)


def estimate_prompt(payload: dict[str, Any]) -> int:
    """A fast estimate to size a hold: about 3 bytes a token for mixed text."""
    texts, extra = prompt_parts(payload)
    size = sum(len(t.encode()) for t in texts)
    return -(-size // 3) + extra + _framing(payload)
