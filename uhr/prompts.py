"""Prompt templates of the benchmarks: the exact strings of their evaluation code.

Used by the VQA job (questions with choices get XLRS's layout), by `uhr.synth` (training
conversations are laid out as XLRS questions) and by `uhr.eval` (each benchmark's own template).
"""

from __future__ import annotations

from enum import Enum

XLRS_CHOICES_HEADER = "The choices are listed below:\n"
XLRS_INSTRUCTION = (
    "\nSelect the best answer for the multiple-choice question based on the image. Only respond with "
    "the letter corresponding to the correct answer (A, B, C, D).\nThe answer is:"
)
# Published without a newline before "The answer(s)"; kept.
XLRS_MULTI_ANSWER_INSTRUCTION = (
    "\nSelect the best answer(s) for the multiple-choice question based on the image. There may be more "
    "than one correct option. Only respond with the letter(s) corresponding to the correct answer(s) "
    "(A, B, C, D), with multiple choices separated by spaces.The answer(s) is(are):"
)

MME_CHOICES_HEADER = " The choices are listed below: \n"
MME_INSTRUCTION = (
    "Select the best answer to the above multiple-choice question based on the image. "
    "Respond with only the letter (A, B, C, D, or E) of the correct option."
)
MME_OFFICIAL_SUFFIX = "\nThe best answer is:"
# LLaVA's short-answer instruction (LRS-VQA's published questions already end with it).
OPEN_INSTRUCTION = "\nAnswer the question using a single word or phrase."


class MmePromptStyle(str, Enum):
    """Which published MME-RealWorld prompt to build.

    `lrs-vqa`: LRS-VQA's `model_vqa_mme_realworld.py`, the protocol of the token-pruning papers
    that report MME-RealWorld-RS. `official`: MME-RealWorld's own `model_vqa_mme_real_world.py`,
    which lists the options differently and ends with "\\nThe best answer is:".
    """

    LRS_VQA = "lrs-vqa"
    OFFICIAL = "official"


def xlrs_prompt(question: str, options: list[str], multi_answer: bool = False) -> str:
    """XLRS-Bench's prompt (lmms-eval `xlrs_doc_to_text`): question, options, instruction.

    Options come lettered ("(A) ..."). `multi_answer` (the overall land-use sub-task, several
    correct options) selects the multi-answer instruction.
    """
    instruction = XLRS_MULTI_ANSWER_INSTRUCTION if multi_answer else XLRS_INSTRUCTION
    return question + XLRS_CHOICES_HEADER + "\n".join(options) + "\n" + instruction


def lrs_vqa_prompt(text: str) -> str:
    """LRS-VQA's prompt (`model_rsvqa.py`): the published `text` and a newline."""
    return text + "\n"


def mme_realworld_prompt(question: str, options: list[str], style: MmePromptStyle = MmePromptStyle.LRS_VQA) -> str:
    """MME-RealWorld's prompt in the chosen published variant (see `MmePromptStyle`)."""
    if style == MmePromptStyle.OFFICIAL:
        listed = "".join(option + "\n" for option in options)
        return question + MME_CHOICES_HEADER + listed + MME_INSTRUCTION + MME_OFFICIAL_SUFFIX
    body = f"{question}{MME_CHOICES_HEADER}\n" + "\n".join(options)
    return body.strip() + "\n" + MME_INSTRUCTION
