"""The one prompt template and decoding settings shared by every method, training and evaluation.

- gist:  [document tokens][gists] + chat(question) -> answer + end-of-turn
- full / rag / presses: chat(document or retrieved chunks + "\\n\\n" + question) -> answer, tokenized as two
  parts, `document_turn_ids` (the template's head + the document) then `question_turn_ids` ("\\n\\n" + question +
  the template's tail), so a press can prefill the first part once and ask with the second exactly as full does.
`chat(x)` is the tokenizer's chat template for one user turn with the generation prompt appended.
"""

from __future__ import annotations

import re
import unicodedata

MAX_NEW_TOKENS = 32  # greedy decoding everywhere; answers here are short spans


def has_text(text: str) -> bool:
    """Whether `text` holds anything to read: a character that is neither whitespace nor a control character
    (a file of NUL bytes decodes as UTF-8 but says nothing)."""
    return any(not (char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn")) for char in text)


def check_encodable(text: str, what: str) -> str:
    """Refuse text holding a lone surrogate: a byte that was not UTF-8 (a latin-1 terminal's argument arrives as
    U+DC80..U+DCFF) or an unpaired JSON escape such as "\\ud800"; the tokenizer cannot read either."""
    for i, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            from gistctl.errors import DataError

            code = ord(char)
            byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
            raise DataError(f"{what} is not valid UTF-8 text: {byte} at character {i + 1}; send UTF-8")
    return text


def check_text(text: str, what: str = "the document") -> None:
    from gistctl.errors import DataError

    check_encodable(text, what)
    if not has_text(text):
        raise DataError(f"{what} is empty: it has no text in it (only whitespace or control characters)")


def check_question(question: str) -> str:
    """A question must say something: a blank one is refused (it would still get an answer)."""
    if not isinstance(question, str) or not has_text(question):
        from gistctl.errors import DataError

        raise DataError("the question is blank; ask something")
    return check_encodable(question, "the question")


def context_ids(tokenizer, text: str) -> list[int]:
    """Document tokens with no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer, user_message: str) -> list[int]:
    """One user turn in the model's chat template, ending with the assistant's generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def question_ids(tokenizer, question: str) -> list[int]:
    """The question segment that follows the gists (a blank question is refused)."""
    return chat_ids(tokenizer, check_question(question))


CODE = re.compile(r"[A-Z0-9][A-Z0-9-]*[A-Z0-9]")  # pass keys, ids, numbers: capitals, digits, inner dashes


def is_code(answer: str) -> bool:
    """Whether an answer is a code (a pass key, an id, a number) rather than words."""
    return CODE.fullmatch(answer) is not None


def spelled_ids(tokenizer, text: str) -> list[int]:
    """`text` one character per token (a character the vocabulary lacks keeps its own tokenisation)."""
    return [i for char in text for i in tokenizer(char, add_special_tokens=False)["input_ids"]]


def answer_ids(tokenizer, answer: str, *, spell_codes: bool = False) -> list[int]:
    """The answer the model is trained to produce, closed by the end-of-turn token.

    `spell_codes`: a code (`is_code`) is spelled one character per token instead of in BPE pieces, so
    every character is one decoding step ("2TP4H9": 2 T P 4 H 9, not 2 TP 4 H 9). Decoding stays free
    greedy decoding; a model trained this way spells codes by itself."""
    if spell_codes and is_code(answer):
        ids = spelled_ids(tokenizer, answer)
    else:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


_SLOT = "\x00gistctl-document\x00"


def chat_parts(tokenizer) -> tuple[str, str]:
    """(head, tail): the chat template's text before and after one user turn's content, generation prompt
    included in the tail."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], add_generation_prompt=True,
                                         tokenize=False)
    head, tail = text.split(_SLOT)
    return head, tail


def document_turn_ids(tokenizer, context: str) -> list[int]:
    """The template's head and the document (trailing whitespace dropped): what a press prefills once."""
    head, _ = chat_parts(tokenizer)
    return tokenizer(head + context.rstrip(), add_special_tokens=False)["input_ids"]


def question_turn_ids(tokenizer, question: str) -> list[int]:
    """What follows the document in the same user turn: the question and the template's tail."""
    _, tail = chat_parts(tokenizer)
    return tokenizer(f"\n\n{check_question(question)}{tail}", add_special_tokens=False)["input_ids"]


def with_context_ids(tokenizer, context: str, question: str) -> list[int]:
    """Prompt for methods that put text in front of the model at question time (full, rag): the document's turn
    and the question's, tokenized apart, so a press blob of the same document continues exactly this prompt."""
    return document_turn_ids(tokenizer, context) + question_turn_ids(tokenizer, question)


def stop_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the tokenizer's eos plus the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return {i for i in ids if i is not None}
