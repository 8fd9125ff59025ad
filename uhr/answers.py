"""Option letters out of a model's free-text reply, by the rules the benchmarks' authors use.

Two published rules, reproduced quirk for quirk so that our accuracies are the authors':

* `extract_choice` — XLRS-Bench (lmms-eval task `xlrs-lite`, `extract_characters_regex`): a SET of
  letters, because overall land-use items have several correct options. The VQA job stores its
  result beside the raw reply for every multiple-choice question.
* `extract_mme_choice` — MME-RealWorld (`evaluation/eval_your_results.py`): ONE letter, with a
  fall-back that looks the reply up in the option texts.

Both strip the same answer prefixes first. The published list misses two commas, so two pairs of
adjacent string literals were joined by Python; the joined strings are kept (marked "sic") because
dropping or splitting them would change which replies are stripped.
"""

from __future__ import annotations

import re

ANSWER_PREFIXES: tuple[str, ...] = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",  # sic
    "Best answer:Best option:",  # sic
)

# The gate of both rules: only UPPER-case A-E counts as "the reply names a letter".
_UPPER_LETTER = re.compile(r"[ABCDE]")
# "(b)" / "(B)": the first thing the XLRS rule looks for.
_PARENTHESISED_LETTER = re.compile(r"\(([a-eA-E])\)")
_ANY_LETTER = re.compile(r"[a-eA-E]")
# MME-RealWorld gives up on replies longer than this many words that name no upper-case letter.
_MME_MAX_WORDS_WITHOUT_LETTER = 10


def strip_answer_prefixes(reply: str) -> str:
    """`reply` stripped of surrounding whitespace, then of every `ANSWER_PREFIXES` occurrence.

    Case-sensitive and anywhere in the text, in list order ("The answer is" goes before "The answer").
    """
    text = reply.strip()
    for prefix in ANSWER_PREFIXES:
        text = text.replace(prefix, "")
    return text


def extract_choice(reply: str) -> str:
    """The option letters a reply names, by the XLRS-Bench rule: a sorted upper-case string.

    1. strip whitespace and the answer prefixes (`strip_answer_prefixes`);
    2. no upper-case A-E anywhere -> "" (so a bare lower-case "b" names nothing);
    3. letters written "(X)" (either case) -> those letters;
    4. otherwise every a-e/A-E character of the reply. The published "standalone letter" pattern
       has optional anchors on both sides, so it matches any such character, inside words too:
       "A and C" -> "ACD" (the a and d of "and"). Its "any letter" fall-back can then never be
       reached, so it has no step here.

    The result is the SET of those letters, upper-cased, as a sorted string: "A", "AC" or "".
    A reply is correct iff this set equals the set of the answer's letters.

    >>> extract_choice("The answer is (B)")
    'B'
    >>> extract_choice("A C")
    'AC'
    >>> extract_choice("b")
    ''
    """
    text = strip_answer_prefixes(reply)
    if not _UPPER_LETTER.search(text):
        return ""
    letters = _PARENTHESISED_LETTER.findall(text) or _ANY_LETTER.findall(text)
    return "".join(sorted({letter.upper() for letter in letters}))


def same_choice(choice: str, answer: str) -> bool:
    """XLRS-Bench's verdict on the letters `extract_choice` took from a reply: the same set as the
    answer's letters ("AC" is right for "CA")."""
    return set(choice) == set(answer)


def extract_mme_choice(reply: str, choices: list[str] | tuple[str, ...]) -> str:
    """The one option letter a reply names, by the MME-RealWorld rule, or "".

    `choices` are the lettered options as published ("(A) Yellow", ...). After stripping the
    answer prefixes:

    1. more than 10 words and no upper-case A-E -> "";
    2. the FIRST upper-case A-E character anywhere -> that letter ("Blue" -> "B", as published);
    3. otherwise the first option whose text contains the lower-cased reply -> its letter
       (the option's second character); an empty reply is contained in every option, so it
       selects the first one;
    4. otherwise "".

    >>> extract_mme_choice("The best answer is C", ["(A) 1", "(B) 2", "(C) 3"])
    'C'
    >>> extract_mme_choice("yellow", ["(A) Red", "(B) Yellow"])
    'B'
    """
    text = strip_answer_prefixes(reply)
    letter = _UPPER_LETTER.search(text)
    if len(text.split()) > _MME_MAX_WORDS_WITHOUT_LETTER and letter is None:
        return ""
    if letter is not None:
        return letter.group(0)
    for choice in choices:
        if len(choice) < 2:
            raise ValueError(f"MME-RealWorld options must be lettered like '(A) text', got {choice!r}")
        if text.lower() in choice.lower():
            return choice[1]
    return ""
