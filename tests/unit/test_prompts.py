"""The message a chat call sends (files, then the prompt) and the context window chosen for it."""

from __future__ import annotations

import pytest

from koubou.jobs import ShippedFile
from koubou.prompts import (
    DEFAULT_ANSWER_TOKENS,
    FILES_PREAMBLE,
    TEMPLATE_TOKENS,
    ExceedsMaxContext,
    context_window,
    estimate_tokens,
    user_message,
)


def test_without_files_the_message_is_the_prompt_itself() -> None:
    assert user_message("Summarise this.") == "Summarise this."


def test_files_come_first_each_delimited_with_its_path_then_the_prompt() -> None:
    files = (ShippedFile(path="src/a.py", content="print('a')\n"), ShippedFile(path="notes.md", content="no newline"))
    message = user_message("Review src/a.py.", files)
    assert message == (
        f"{FILES_PREAMBLE}\n\n"
        '<file path="src/a.py">\nprint(\'a\')\n</file>\n\n'
        '<file path="notes.md">\nno newline\n</file>\n\n'
        "Review src/a.py."
    )
    assert message.endswith("Review src/a.py.")  # the request is what the model reads last


def test_odd_paths_cannot_break_out_of_the_attribute() -> None:
    message = user_message("p", (ShippedFile(path='a"b<c>&.txt', content=""),))
    assert '<file path="a&quot;b&lt;c&gt;&amp;.txt">\n</file>' in message


def test_token_estimates_err_high() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abc") == 1 and estimate_tokens("abcd") == 2  # 3 ASCII characters a token, rounded up
    assert estimate_tokens("工房") == 2  # one token for each other character
    english = "The quick brown fox jumps over the lazy dog. " * 100
    assert estimate_tokens(english) >= len(english) / 4  # real tokenizers: about 4 characters of English a token


def test_the_steady_default_is_kept_whenever_it_is_enough() -> None:
    assert context_window(10, None, 8192, 131072) == 8192
    fits = 8192 - TEMPLATE_TOKENS - DEFAULT_ANSWER_TOKENS
    assert context_window(fits, None, 8192, 131072) == 8192
    assert context_window(fits + 1, None, 8192, 131072) == 16384


def test_a_larger_prompt_gets_the_next_power_of_two_up_to_the_maximum() -> None:
    assert context_window(20_000, None, 8192, 131072) == 32768
    assert context_window(20_000, 100, 8192, 131072) == 32768
    assert context_window(40_000, None, 8192, 50_000) == 50_000  # the power of two would pass the maximum
    assert context_window(100, 10_000, 8192, 131072) == 16384  # the answer's room counts too


def test_a_prompt_over_the_maximum_is_refused_naming_the_sizes() -> None:
    with pytest.raises(ExceedsMaxContext) as caught:
        context_window(131072, None, 8192, 131072)
    assert (caught.value.estimated, caught.value.maximum) == (131072, 131072)
    assert "131072 tokens" in str(caught.value) and "KOUBOU_MAX_NUM_CTX" in str(caught.value)
    # A large answer budget alone never refuses: the answer gets what is left.
    assert context_window(1000, 1_000_000, 8192, 131072) == 131072
