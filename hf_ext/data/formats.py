"""SFT data formats: how a row becomes `input_ids` plus a `completion_mask` that covers exactly the response.

Every format encodes the prompt and the response separately and concatenates the ids. Encoding them jointly (as
TRL does for prompt-completion rows) lets a token merge across the boundary, so the first "response" token would
carry prompt characters; encoding separately gives the exact ids the model must produce after the prompt at
generation time, which is what it is trained on. The same `prompt_ids` serve training and evaluation.

- `prompt_completion`: plain text; the tokenizer's usual special tokens (e.g. BOS) before the prompt, EOS after the
  completion.
- `messages`: a chat (or a prompt/completion pair as a user and an assistant turn) rendered with the tokenizer's chat
  template; loss on every assistant turn up to and including its end-of-turn token (EOS). Works with templates that
  have no `{% generation %}` markers, such as SmolLM2's ChatML, by rendering the conversation turn by turn.
- `instruction`: the base-model format `Instruction: {instruction}\\nResponse: {response}\\nEND`, chat template off,
  no special tokens except one EOS. The boundary is after "Response:"; the separating space belongs to the response
  because BPE tokenizers merge it into the first word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from hf_ext.errors import UserInputError

Row = dict[str, Any]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special_tokens: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special_tokens)["input_ids"]


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise UserInputError(f"tokenizer {tokenizer.name_or_path}: has no EOS token; SFT needs one to learn to stop")
    return tokenizer.eos_token_id


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    completion_mask: list[int]


class DataFormat:
    name: str
    columns: tuple[str, ...]

    def encode(self, row: Row, tokenizer: PreTrainedTokenizerBase) -> Encoded:
        raise NotImplementedError

    def prompt_ids(self, prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Ids that a single-turn `prompt` is turned into before the response, at training and generation time."""
        raise NotImplementedError

    def response_ids(self, prompt: str, response: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The trained ids that follow `prompt_ids` for `response`: the response and its END/EOS."""
        raise NotImplementedError

    def encode_pair(self, prompt: str, response: str, tokenizer: PreTrainedTokenizerBase) -> Encoded:
        prompt_ids = self.prompt_ids(prompt, tokenizer)
        response_ids = self.response_ids(prompt, response, tokenizer)
        return Encoded(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids))

    def extract_response(self, generated: str) -> str:
        """The answer part of decoded generated text (special tokens already skipped)."""
        return generated.strip()

    def validate(self, row: Row) -> str | None:
        """None if the row is usable, else what is wrong with it (field and expectation)."""
        for column in self.columns:
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                return f"field '{column}': expected a non-empty string, got {_describe(value)}"
        return None


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (missing or null)"
    if isinstance(value, str):
        return "an empty string"
    return f"{type(value).__name__} {str(value)[:40]!r}"


class PromptCompletion(DataFormat):
    name = "prompt_completion"
    columns = ("prompt", "completion")

    def prompt_ids(self, prompt, tokenizer):
        bos = tokenizer.bos_token
        already_has_bos = bos is not None and prompt.startswith(bos)
        return _ids(tokenizer, prompt, special_tokens=not already_has_bos)

    def response_ids(self, prompt, response, tokenizer):
        return _ids(tokenizer, response) + [_eos_id(tokenizer)]

    def encode(self, row, tokenizer):
        return self.encode_pair(row["prompt"], row["completion"], tokenizer)


class Instruction(DataFormat):
    name = "instruction"
    columns = ("instruction", "response")
    PROMPT = "Instruction: {instruction}\nResponse:"
    COMPLETION = " {response}\nEND"

    def prompt_ids(self, prompt, tokenizer):
        return _ids(tokenizer, self.PROMPT.format(instruction=prompt))

    def response_ids(self, prompt, response, tokenizer):
        return _ids(tokenizer, self.COMPLETION.format(response=response)) + [_eos_id(tokenizer)]

    def encode(self, row, tokenizer):
        return self.encode_pair(row["instruction"], row["response"], tokenizer)

    def extract_response(self, generated):
        return generated.split("\nEND")[0].strip()


class Messages(DataFormat):
    name = "messages"
    columns = ("messages",)
    ROLES = ("system", "user", "assistant")

    def _render(self, tokenizer, messages, generation_prompt=False) -> str:
        if tokenizer.chat_template is None:
            raise UserInputError(
                f"tokenizer {tokenizer.name_or_path}: has no chat template; use data_format: instruction or "
                "prompt_completion for a base model"
            )
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt_ids(self, prompt, tokenizer):
        return _ids(tokenizer, self._render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True))

    def response_ids(self, prompt, response, tokenizer):
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return _ids(tokenizer, next(text for text, trained in self.segments(turns, tokenizer) if trained))

    def segments(self, messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, trained) pieces: each assistant reply plus its EOS is trained."""
        full = self._render(tokenizer, messages)
        eos = tokenizer.eos_token
        pieces: list[tuple[str, bool]] = []
        position = 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(tokenizer, messages[:index], generation_prompt=True)
            through = self._render(tokenizer, messages[: index + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise UserInputError(
                    f"tokenizer {tokenizer.name_or_path}: its chat template does not render a conversation as a "
                    "prefix of its continuation, so assistant turns cannot be located; use data_format: "
                    "prompt_completion with pre-rendered text"
                )
            reply = through[len(before) :]
            end = reply.find(eos) if eos else -1
            trained = reply[: end + len(eos)] if end >= 0 else reply
            pieces += [(full[position : len(before)], False), (trained, True)]
            position = len(before) + len(trained)
        pieces.append((full[position:], False))
        return [(text, trained) for text, trained in pieces if text]

    def encode(self, row, tokenizer):
        input_ids: list[int] = []
        mask: list[int] = []
        for text, trained in self.segments(row["messages"], tokenizer):
            ids = _ids(tokenizer, text)
            input_ids += ids
            mask += [int(trained)] * len(ids)
        return Encoded(input_ids, mask)

    def validate(self, row):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            return f"field 'messages': expected a non-empty list of {{role, content}}, got {_describe(messages)}"
        for turn, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"field 'messages' turn {turn}: expected a {{role, content}} mapping, got {_describe(message)}"
            if message.get("role") not in self.ROLES:
                return f"field 'messages' turn {turn}: role must be one of {', '.join(self.ROLES)}, got {message.get('role')!r}"
            content = message.get("content")
            if not isinstance(content, str) or not content.strip():
                return f"field 'messages' turn {turn}: 'content' must be a non-empty string, got {_describe(content)}"
        if not any(m["role"] == "assistant" for m in messages):
            return "field 'messages': no assistant turn, so nothing would be trained"
        return None


FORMATS: dict[str, DataFormat] = {f.name: f for f in (PromptCompletion(), Messages(), Instruction())}


def _names(columns: list[str]) -> str:
    return ", ".join(c if c.isprintable() else repr(c) for c in columns)  # a key with a newline keeps errors one line


def detect_format(columns: list[str], requested: str, source: str) -> DataFormat:
    """The format to use for a dataset with `columns`; `requested` is the recipe's `data_format` (or `auto`)."""
    if requested != "auto":
        data_format = FORMATS[requested]
        if requested != "prompt_completion" and {"prompt", "completion"} <= set(columns):
            return data_format  # seen through `as_format_row`: a chat turn pair, or an instruction/response
        missing = [c for c in data_format.columns if c not in columns]
        if missing:
            raise UserInputError(
                f"{source}: data_format {requested} needs column(s) {', '.join(missing)}; found {_names(columns)}"
            )
        return data_format
    for data_format in (FORMATS["messages"], FORMATS["instruction"], FORMATS["prompt_completion"]):
        if set(data_format.columns) <= set(columns):
            return data_format
    raise UserInputError(
        f"{source}: cannot tell the data format from columns {_names(columns)}; expected 'messages', "
        "'instruction' + 'response', or 'prompt' + 'completion'"
    )


def as_format_row(row: Row, data_format: DataFormat) -> Row:
    """A prompt/completion row seen through `data_format` (a chat turn pair, or an instruction/response)."""
    if data_format.name == "messages" and "messages" not in row:
        return {"messages": [{"role": "user", "content": row.get("prompt")}, {"role": "assistant", "content": row.get("completion")}]}
    if data_format.name == "instruction" and "instruction" not in row:
        return {"instruction": row.get("prompt"), "response": row.get("completion")}
    return row


def encode_dataset(dataset, data_format: DataFormat, tokenizer, max_length: int | None, source: str):
    """Validate every row, then encode it; the first bad row stops everything with its index and field."""
    for index, row in enumerate(dataset):
        # A prompt/completion row is checked as such first, so the error names the field the file really has.
        is_pair = "messages" not in row and {"prompt", "completion"} <= row.keys()
        problem = (FORMATS["prompt_completion"].validate(row) if is_pair else None) or data_format.validate(
            as_format_row(row, data_format)
        )
        if problem:
            raise UserInputError(f"{source}: row {index + 1}: {problem}")

    def encode(row):
        encoded = data_format.encode(as_format_row(row, data_format), tokenizer)
        return {"input_ids": encoded.input_ids, "completion_mask": encoded.completion_mask}

    encoded = dataset.map(encode, remove_columns=dataset.column_names, desc=f"Encoding {source} ({data_format.name})")
    if max_length is not None:
        for index, length in enumerate(len(ids) for ids in encoded["input_ids"]):
            if length > max_length:
                raise UserInputError(
                    f"{source}: row {index + 1}: {length} tokens is longer than max_length {max_length}; raise max_length "
                    "or shorten/remove the row (truncating would cut the response)"
                )
    return encoded
