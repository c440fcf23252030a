"""Text <-> token ids for the primary, built on the `tokenizers` library, plus chat templating and streaming decode.

A GGUF file carries everything a byte-level BPE tokenizer needs: the token strings (in GPT-2's byte-to-unicode
alphabet), the merges, each token's type, special ids and a Jinja chat template. `Tokenizer.from_gguf` rebuilds it.
The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` name; for SmolLM2 ("smollm", as for StarCoder) that is:
split off every digit on its own (`\\p{N}`), then split the rest with GPT-2's regex, then map bytes to the BPE alphabet.

This module imports neither JAX nor NumPy (the `gguf` package is imported only by `from_gguf`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

if TYPE_CHECKING:
    import gguf

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4

# `tokenizer.ggml.pre` values whose pre-tokenization is "each digit alone, then GPT-2's regex".
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
# ... and those that are GPT-2's regex alone.
_GPT2 = {"gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais"}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex, then bytes
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2:
        return byte_level
    raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (known: {sorted(_DIGITS_THEN_GPT2 | _GPT2)})")


def _token_content(token: Any) -> str | None:
    """A special token entry of tokenizer_config.json: a string, an AddedToken dict, or null."""
    if isinstance(token, dict):
        return token.get("content")
    return token


class Tokenizer:
    """A byte-level BPE tokenizer with the model's special tokens and chat template.

    Build one with `Tokenizer.from_gguf(path)` or `Tokenizer.from_hf_dir(directory)`.

    Args:
        backend: The `tokenizers.Tokenizer` doing the work.
        bos_token_id: Beginning-of-sequence id, or None.
        eos_token_id: End-of-sequence id, or None.
        pad_token_id: Padding id, or None.
        chat_template: Jinja source of the chat template, or None.
        add_bos_token: Whether `encode` prepends BOS by default.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self._bos = bos_token_id
        self._eos = eos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self._template: jinja2.Template | None = None

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_gguf(cls, source: str | Path | gguf.GGUFReader) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes (`tokenizer.ggml.model == "gpt2"`, i.e. byte-level BPE).

        Tokens of type CONTROL (`<|im_start|>`, `<|endoftext|>`, ...) become special tokens, matched whole in text;
        USER_DEFINED ones become plain added tokens.

        Args:
            source: Path of a `.gguf` file, or an open `gguf.GGUFReader` (to share one with `load_gguf`).

        Raises:
            ValueError: Not a byte-level BPE vocabulary, or an unknown pre-tokenizer.
        """
        import gguf

        reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(f"tokenizer.{key}")
            return default if f is None else f.contents()

        if field("ggml.model") != "gpt2":
            raise ValueError(f"only byte-level BPE GGUF vocabularies are supported, got {field('ggml.model')!r}")
        tokens: list[str] = field("ggml.tokens")
        types: list[int] = field("ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ")) for m in field("ggml.merges", [])]
        backend = _HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(field("ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        typed = list(zip(tokens, types, strict=True))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == _USER_DEFINED])
        return cls(
            backend,
            bos_token_id=field("ggml.bos_token_id"),
            eos_token_id=field("ggml.eos_token_id"),
            pad_token_id=field("ggml.padding_token_id"),
            chat_template=field("chat_template"),
            add_bos_token=bool(field("ggml.add_bos_token", False)),
        )

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json` and `chat_template.jinja` when present).

        Special ids come from `tokenizer_config.json`'s `bos_token` / `eos_token` / `pad_token` strings, else from
        `config.json`'s `bos_token_id` / `eos_token_id`.
        """
        directory = Path(directory)
        backend = _HFTokenizer.from_file(str(directory / "tokenizer.json"))
        cfg_path, model_cfg_path = directory / "tokenizer_config.json", directory / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        model_cfg = json.loads(model_cfg_path.read_text()) if model_cfg_path.exists() else {}

        def special_id(name: str) -> int | None:
            content = _token_content(cfg.get(f"{name}_token"))
            if content is not None and backend.token_to_id(content) is not None:
                return backend.token_to_id(content)
            value = model_cfg.get(f"{name}_token_id")
            return value[0] if isinstance(value, list) else value

        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        return cls(
            backend,
            bos_token_id=special_id("bos"),
            eos_token_id=special_id("eos"),
            pad_token_id=special_id("pad"),
            chat_template=template,
            add_bos_token=bool(cfg.get("add_bos_token", False)),
        )

    # ----------------------------------------------------------------------------------------------- queries

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: EOS, plus `<|im_end|>` when the vocabulary has it."""
        ids = [] if self._eos is None else [self._eos]
        im_end = self.backend.token_to_id("<|im_end|>")
        if im_end is not None and im_end not in ids:
            ids.append(im_end)
        return tuple(ids)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry spelled as stored (byte-level alphabet, e.g. "Ġthe"), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Stored spelling of an id, or None when out of range."""
        return self.backend.id_to_token(token_id)

    # --------------------------------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. `<|im_start|>`) map to their single ids.

        Args:
            text: Any string.
            add_bos: Prepend BOS; None follows the model's `add_bos_token` (False for SmolLM2).

        Returns:
            [T] token ids.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self._bos is not None:
            ids = [self._bos, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form whole UTF-8 characters come out as U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh `IncrementalDecoder` over this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------------------- chat template

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's chat template (sandboxed Jinja, as Hugging Face renders it).

        Args:
            messages: `[{"role": "system" | "user" | "assistant", "content": str}, ...]`.
            add_generation_prompt: End with the header of an assistant turn (`<|im_start|>assistant\\n`).

        Returns:
            The prompt text; encode it with `encode` (no BOS for SmolLM2: the template opens with `<|im_start|>`).

        Raises:
            ValueError: The tokenizer has no chat template, or the template raised.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )

            def raise_exception(message: str) -> None:
                raise jinja2.exceptions.TemplateError(message)

            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            self._template = env.from_string(self.chat_template)
        special = {
            "bos_token": "" if self._bos is None else self.backend.id_to_token(self._bos),
            "eos_token": "" if self._eos is None else self.backend.id_to_token(self._eos),
        }
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e


def chat_prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as one user message in the chat template, tokenized: the ids `tandem generate --chat`, `tandem bench` and
    `tandem tune` send for a prompt."""
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields a trailing U+FFFD.
    Tokens are held back while their decoded tail ends in U+FFFD, and released once the character completes. Each step
    decodes only a short window (the ids since the last released text, plus the tokens before them for context), so
    streaming a long generation stays linear.

    The deltas of all `push` calls, plus `flush()`, concatenate to `tokenizer.decode(all_ids)`.

    Args:
        tokenizer: The tokenizer to decode with.
        skip_special_tokens: Drop special tokens from the text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: context tokens already released
        self._read = 0  # ids before this are released as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: int | Iterable[int]) -> str:
        """Append token ids; return the newly complete text ('' while nothing new is complete).

        When several ids arrive at once, text up to the last complete character is released even if the final
        tokens end inside a character.
        """
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        before = self._decode(self.ids[self._prefix : self._read])
        # A character is at most 4 bytes, so an incomplete tail spans at most the last 3 tokens.
        for end in range(len(self.ids), max(self._read, len(self.ids) - 4), -1):
            after = self._decode(self.ids[self._prefix : end])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self._prefix, self._read = self._read, end
                return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Release whatever is held back (a trailing incomplete character comes out as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]
