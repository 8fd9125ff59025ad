"""The option-letter rules of XLRS-Bench (lmms-eval `xlrs-lite`) and MME-RealWorld, quirks included."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uhr.answers import ANSWER_PREFIXES, extract_choice, extract_mme_choice, strip_answer_prefixes

# --- XLRS-Bench -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # plain and lettered replies
        ("B", "B"),
        ("  C\n", "C"),
        ("(D)", "D"),
        ("(D) 12 ships", "D"),
        ("The answer is (B)", "B"),
        ("The best answer is A", "A"),
        ("The correct answer is C.", "C"),
        ("The answer: D", "D"),
        # multi-answer land-use replies: the set, sorted, whatever the separator or order
        ("A C", "AC"),
        ("C A", "AC"),
        ("A, C", "AC"),
        ("AC", "AC"),
        ("(A) (C)", "AC"),
        ("B B", "B"),
        # lower-case letters: ignored unless an upper-case A-E appears somewhere
        ("b", ""),
        ("(b)", ""),
        ("the answer is b", ""),
        ("Answer: (b)", "B"),  # the "A" of "Answer" opens the gate; "(b)" is then taken
        # the "standalone" pattern has optional anchors: every a-e letter counts, inside words too
        ("A and C", "ACD"),
        ("B. The harbour", "ABE"),
        ("The answer is A, but C is also possible", "ABCE"),
        ("Dock", "CD"),
        # parenthesised letters win over letters in words
        ("I think (C) because the road is wide", "C"),
        ("Both (A) and (C) are correct", "AC"),
        # no letter, empty
        ("", ""),
        ("   ", ""),
        ("harbour", ""),
        ("12 ships", ""),
        ("Yes", ""),
    ],
)
def test_extract_choice_pins_the_xlrs_rule(reply: str, expected: str) -> None:
    assert extract_choice(reply) == expected


def test_prefixes_are_removed_case_sensitively_and_in_published_order() -> None:
    # "The answer is" goes before "The answer", so no stray "is" is left behind.
    assert strip_answer_prefixes("The answer is B") == " B"
    # Upper case only: a lower-case prefix stays, and its letters then count.
    assert strip_answer_prefixes("the answer is B") == "the answer is B"
    assert extract_choice("the answer is B") == "ABE"
    # The two joined literals of the published list (missing commas) are kept as joined strings.
    assert "The best option isThe correct option is" in ANSWER_PREFIXES
    assert "Best answer:Best option:" in ANSWER_PREFIXES
    # So "Best answer:" alone is not removed, and its a/e/B count as letters.
    assert extract_choice("Best answer: B") == "ABE"


_LETTERS = "ABCDE"


@given(st.sets(st.sampled_from(_LETTERS), min_size=1), st.sampled_from([" ", ", ", ",", "\n"]), st.randoms())
def test_multi_answer_replies_give_the_letter_set(letters: set[str], separator: str, random) -> None:
    ordered = list(letters)
    random.shuffle(ordered)
    assert extract_choice(separator.join(ordered)) == "".join(sorted(letters))


@given(st.text(alphabet=string.printable, max_size=80))
def test_extract_choice_returns_a_sorted_letter_set(reply: str) -> None:
    result = extract_choice(reply)
    assert set(result) <= set(_LETTERS)
    assert list(result) == sorted(set(result))
    if not any(letter in strip_answer_prefixes(reply) for letter in _LETTERS):
        assert result == ""
    # The result is itself a reply that names exactly the same letters.
    assert extract_choice(result) == result


# --- MME-RealWorld ----------------------------------------------------------------------------

COLOURS = ["(A) Red", "(B) Yellow", "(C) Gray", "(D) White", "(E) The image does not feature the roof"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("C", "C"),
        ("(D)", "D"),
        ("The best answer is E", "E"),
        ("The answer is (B)", "B"),
        # the FIRST upper-case A-E anywhere, even inside a word
        ("Blue", "B"),
        ("Gray (C)", "C"),
        ("Answer: C", "A"),
        # no upper-case letter: look the reply up in the option texts (lower-cased)
        ("yellow", "B"),
        ("gray", "C"),
        ("white", "D"),
        # an empty reply is contained in every option: the first one is chosen, as published
        ("", "A"),
        ("  ", "A"),
        # long replies without an upper-case letter give up
        ("it is hard to tell what colour the roof of that building has", ""),
        ("purple", ""),
    ],
)
def test_extract_mme_choice_pins_the_mme_rule(reply: str, expected: str) -> None:
    assert extract_mme_choice(reply, COLOURS) == expected


def test_lower_case_letters_are_looked_up_as_text_in_the_options() -> None:
    # A lower-case "b" is not a letter to MME-RealWorld: it is searched for in the option texts,
    # and the first option containing it wins, the "(b)" prefix included.
    assert extract_mme_choice("b", ["(A) Red", "(B) Blue"]) == "B"
    assert extract_mme_choice("b", ["(A) Bridge", "(B) Blue"]) == "A"
    assert extract_mme_choice("(b)", ["(A) Red", "(B) Blue"]) == "B"
    assert extract_mme_choice("b", ["(A) Red", "(C) Grey"]) == ""


def test_a_reply_of_ten_words_is_still_looked_up_and_one_of_eleven_is_not() -> None:
    # "more than 10 words": the 10th word is the last one a reply without a letter may have.
    options = ["(A) one two three four five six seven eight nine ten eleven", "(B) Red"]
    assert extract_mme_choice("one two three four five six seven eight nine ten", options) == "A"
    assert extract_mme_choice("one two three four five six seven eight nine ten eleven", options) == ""


def test_extract_mme_choice_rejects_unlettered_options() -> None:
    with pytest.raises(ValueError, match="lettered"):
        extract_mme_choice("red", ["A"])


@given(st.text(alphabet=string.printable, max_size=80))
def test_extract_mme_choice_returns_one_letter_or_nothing(reply: str) -> None:
    result = extract_mme_choice(reply, COLOURS)
    assert result == "" or result in _LETTERS
