"""Prompts of ``servinglab bench spec``: input-grounded tasks (the answer copies the prompt) and open-ended ones.

Prompt lookup (n-gram) drafting pays off only where the output repeats spans of the
input: edits and rewrites of a given text or code. Open-ended prompts show where it stops.
"""

from __future__ import annotations


CODE = ("def area(width, height):\n    x = width * height\n    return x\n\n\ndef total(values):\n    x = 0\n"
        "    for v in values:\n        x += v\n    return x\n\n\ndef mean(values):\n    x = total(values)\n    return x / len(values)\n")
NOTICE = ("The reading room on the second floor opens at nine in the morning and closes at six in the evening. "
          "Members may borrow up to five books at a time for three weeks. Members must return books to the front desk, "
          "not to the shelves. Food and drinks are not allowed in the reading room, but members may drink water.")
EMAIL = ("Hi team,\n\nOur weekly planning meeting will take place on Tuesday at 10am in room 4B. Please bring your "
         "status updates and the list of open issues. Anna will present the new release schedule, and Ben will walk "
         "us through the test results.\n\nThanks,\nMaria")
TYPOS = ("The comittee will recieve the final report next wednesday. Every member should read it carefuly before the "
         "meeting, and send there comments to the secretary untill friday.")
# Edits and rewrites of a given text or code: the answer copies long spans of the prompt, which is
# what prompt lookup guesses. The mix includes weaker copiers (a summary, a spelling fix, code edits).
GROUNDED = [
    f"Repeat this email, but change the meeting day from Tuesday to Thursday:\n\n{EMAIL}",
    f"Repeat this notice word for word, but change 'nine in the morning' to 'ten in the morning':\n\n{NOTICE}",
    f"Copy this email, then add a P.S. asking everyone to arrive five minutes early:\n\n{EMAIL}",
    f"Rewrite the following code with the variable x renamed to count:\n\n```python\n{CODE}```",
    f"Repeat the following code exactly, and add a comment line at the top:\n\n```python\n{CODE}```",
    f"Rewrite this notice, replacing the word 'Members' with 'Visitors':\n\n{NOTICE}",
    f"Fix the spelling mistakes in this text and return the corrected text:\n\n{TYPOS}",
    f"Summarize this email in two sentences:\n\n{EMAIL}",
]
OPEN_ENDED = [
    "Write a short story about a robot who learns to paint.",
    "What are some good habits for staying healthy while working from home?",
    "Explain how a rainbow forms.",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "Why do cats purr?",
    "Describe your ideal weekend in a few sentences.",
    "Write a short poem about the ocean.",
    "What should I pack for a weekend hiking trip?",
]


def chat_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as one user turn of the model's chat template."""
    out = []
    for text in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out
