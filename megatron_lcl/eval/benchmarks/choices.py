"""Multiple-choice items (ScienceQA, MMBench): the option block of the prompt and reading an option
letter back out of a free-text answer, as each benchmark's reference scripts do."""

import re
from typing import Dict, List, Optional

LETTERS = "ABCDEFGHIJ"
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


def option_lines(options: List[str]) -> str:
    """"A. first\\nB. second" (LLaVA-1.5's layout)."""
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def letter_as_scienceqa(text: str, num_options: int) -> Optional[str]:
    """LLaVA's `eval_science_qa.py`: the answer is a letter, starts "X. ", or says "The answer is X."
    once; anything else fails (None), and so does a letter beyond the options."""
    letters = LETTERS[:5]  # its args.options
    if text in letters:
        letter = text
    elif len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in LETTERS[:num_options] else None


def letter_as_mmbench(text: str, options: Dict[str, str]) -> Optional[str]:
    """VLMEvalKit's exact matching (`can_infer`) before any judge model: exactly one option letter
    standing as a word (after .()[],:;!*#{} become spaces), else exactly one option's text inside
    the answer (case-insensitive); else None (counted wrong: no GPT judge runs here)."""
    spaced = text
    for c in ".()[],:;!*#{}":
        spaced = spaced.replace(c, " ")
    words = spaced.split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    if not named:
        by_text = [letter for letter, option in options.items() if option.lower() in text.lower()]
        if len(by_text) == 1:
            return by_text[0]
    return None
