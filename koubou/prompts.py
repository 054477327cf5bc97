"""What a chat call sends: one user message (the shipped files, then the prompt), and the context
window (Ollama's num_ctx) it needs.

The API sizes the window at submit time from the same message the worker will send, so a prompt
that cannot fit is refused before it is queued, and the worker only sends what the job says.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from .jobs import ShippedFile

#: Tokens kept free for the answer when the task sets no `max_tokens`.
DEFAULT_ANSWER_TOKENS = 2048
#: Tokens the chat template and a model's built-in system prompt may add around the message.
TEMPLATE_TOKENS = 256
#: Said before the files, so the model knows what the tags are.
FILES_PREAMBLE = "The files below are context for the request that follows them. Each one is between <file path=\"...\"> and </file>."


class ExceedsMaxContext(Exception):
    """The prompt needs a larger context window than koubou may ask for (KOUBOU_MAX_NUM_CTX)."""

    def __init__(self, estimated: int, maximum: int) -> None:
        super().__init__(
            f"the prompt and its files come to about {estimated} tokens (estimated from their characters), "
            f"more than the largest context window koubou asks for, {maximum} tokens (KOUBOU_MAX_NUM_CTX): "
            "send fewer or smaller files, or a shorter prompt"
        )
        self.estimated, self.maximum = estimated, maximum


def user_message(prompt: str, files: Sequence[ShippedFile] = ()) -> str:
    """The one user message of a chat call: each file delimited with its path, then the prompt.

    Files and prompt share one message on purpose: when a conversation does not fit, Ollama's chat
    template drops whole older messages without a word, so a separate files message could vanish;
    within the last message its runner cuts to exactly num_ctx tokens, which the backend detects.
    """
    if not files:
        return prompt
    parts = [FILES_PREAMBLE, ""]
    for shipped in files:
        content = shipped.content if shipped.content.endswith("\n") or not shipped.content else shipped.content + "\n"
        parts.append(f'<file path="{html.escape(shipped.path, quote=True)}">\n{content}</file>\n')
    parts.append(prompt)
    return "\n".join(parts)


def estimate_tokens(text: str) -> int:
    """Tokens `text` takes, estimated high: 3 ASCII characters or 1 other character per token.

    Real tokenizers average about 4 characters of English and 3-3.5 of code per token, and CJK
    about one token per character; erring high costs memory, erring low truncates the prompt.
    """
    ascii_chars = len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // 3) + (len(text) - ascii_chars)


def context_window(prompt_tokens: int, max_tokens: int | None, default: int, maximum: int) -> int:
    """The num_ctx for a prompt of `prompt_tokens` (estimated) with room for the answer.

    The steady `default` whenever it is enough (Ollama reloads a model when num_ctx changes), else
    the next power of two up to `maximum`. Raises ExceedsMaxContext when even the prompt alone does
    not fit in `maximum`; the answer's room is cut down to what is left rather than refused.
    """
    needed_for_prompt = prompt_tokens + TEMPLATE_TOKENS
    if needed_for_prompt > maximum:
        raise ExceedsMaxContext(prompt_tokens, maximum)
    needed = needed_for_prompt + (max_tokens if max_tokens is not None else DEFAULT_ANSWER_TOKENS)
    if needed <= default:
        return default
    return min(maximum, 1 << (needed - 1).bit_length())
