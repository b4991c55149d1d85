"""The Sudoku model's vocabulary, tokenizer and prompt: 192 ids (specials, one id per character of
the puzzle alphabet, 81 cell tokens <r1c1> .. <r9c9>) and the chat template around a puzzle."""
from __future__ import annotations

from pathlib import Path

from models.fixtures import save_tokenizer

SPECIAL = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>",
}
VOCAB_SIZE = 192
NEWLINE_ID = 107
CELL0_ID = 108  # <r1c1> .. <r9c9> = 108 .. 188
CELLS = [f"<r{r + 1}c{c + 1}>" for r in range(9) for c in range(9)]
CHARS = list("123456789.0 abcdefghijklmnopqrstuvwxyz|-+:,")
EOS_ID = 1
CANVAS = 82  # 81 digits + <eos>

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "<|turn>system{{ '\\n' }}" + "".join(CELLS) + "<turn|>{{ '\\n' }}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}"
    "<|turn>user{{ '\\n' }}"
    "{{ m.content | replace(' ', '') | replace('\\n', '') | replace('\\r', '') | replace('\\t', '') "
    "| replace('|', '') | replace('-', '') | replace('+', '') | replace('0', '.') | replace('_', '.') }}"
    "<turn|>{{ '\\n' }}"
    "{%- elif m.role != 'system' -%}"
    "<|turn>model{{ '\\n' }}{{ m.content | trim }}<turn|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model{{ '\\n' }}<|channel>thought{{ '\\n' }}<channel|>{%- endif -%}"
)


def vocab() -> dict[str, int]:
    v = {name: i for i, name in SPECIAL.items()}
    v["\n"] = NEWLINE_ID
    for k, name in enumerate(CELLS):
        v[name] = CELL0_ID + k
    free = [i for i in range(5, 98) if i not in SPECIAL]
    for ch, i in zip(CHARS, free):
        v[ch] = i
    used = set(v.values())
    for i in range(VOCAB_SIZE):
        if i not in used:
            v[f"<unused{i}>"] = i
    assert len(v) == VOCAB_SIZE and max(v.values()) == VOCAB_SIZE - 1
    return v


def build_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    v = vocab()
    tok = Tokenizer(models.WordLevel(vocab=v, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, i in sorted(v.items(), key=lambda kv: kv[1]) if t.startswith("<") and len(t) > 1])
    return tok


def write_tokenizer(out: Path) -> None:
    """tokenizer.json built here; tokenizer_config.json is the shipped one, whose chat template also
    refuses what is not a puzzle and which carries the model's dgport section (task, check prompts).
    CHAT_TEMPLATE above renders valid puzzles exactly as it does."""
    import shutil

    save_tokenizer(out, build_tokenizer(), CHAT_TEMPLATE, 4096)
    shutil.copyfile(Path(__file__).resolve().with_name("tokenizer_config.json"), out / "tokenizer_config.json")


def render_prompt(puzzle: str) -> str:
    """The chat-template rendering of one user turn (what dgport/HF produce), without jinja."""
    return ("<bos><|turn>system\n" + "".join(CELLS) + "<turn|>\n<|turn>user\n" + puzzle
            + "<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
