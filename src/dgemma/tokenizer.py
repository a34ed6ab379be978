"""Tokenizer for dgemma: a thin wrapper over the `tokenizers` library plus HF-style chat templates.

What it knows:
  * loading a Hugging Face tokenizer folder: ``tokenizer.json`` (required), ``tokenizer_config.json``
    (bos/eos/pad/unk tokens, ``add_bos_token``, ``chat_template`` as a string or the list-of-{name,template}
    form, of which "default" is used) and ``chat_template.jinja`` (wins over the config's template);
  * rendering chat templates the way transformers does: a sandboxed jinja2 environment with
    trim_blocks/lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now`` and a non-HTML-escaping
    ``tojson``; the special tokens are passed as strings, ``tools``/``documents`` default to None, and
    message keys whose value is None are dropped, as transformers does;
  * training a small byte-level BPE tokenizer (``train_bpe``) with Gemma's pad=0, eos=1, bos=2 ids and a
    Gemma-style chat template.

What it doesn't know: slow (sentencepiece/python) tokenizers, multimodal or list-valued message content (a
message's content must be a string, or None in one with tool_calls), batching, padding, truncation, assistant masks,
``continue_final_message``, and any tokenizer_config setting not listed above.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

__all__ = ["CHAT_TEMPLATE", "DEFAULT_SPECIAL_TOKENS", "Tokenizer", "TokenizerError", "train_bpe"]

DEFAULT_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]

# Gemma-style: bos, then "<start_of_turn>{role}\n{content}<end_of_turn>\n" per message ("assistant" -> "model").
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    r"{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """A user-facing tokenizer problem (missing files, bad messages, template errors)."""


def _byte_symbols() -> dict[str, int]:
    """Byte-level BPE's alphabet: each of the 256 bytes as one printable character (printable Latin-1 bytes as
    themselves, the others as the characters from U+0100 up, in byte order) -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_OF = _byte_symbols()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from None


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"message {i} must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str) and not (key == "content" and m.get("tool_calls")):
                raise TokenizerError(f"message {i} needs a string {key!r}, got {m.get(key)!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


class Tokenizer:
    """Encode/decode text and render chat templates. Usually built with ``Tokenizer.from_dir``."""

    def __init__(self, tokenizer: _HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, add_bos_token: bool = False,
                 chat_template: str | None = None) -> None:
        self._tok = tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._compiled: tuple[str, jinja2.Template] | None = None  # (source, compiled)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` and ``chat_template.jinja`` if present)."""
        path = Path(path)
        if path.is_file() and path.name == "tokenizer.json":
            path = path.parent
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {path}")
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a plain Exception
            raise TokenizerError(f"could not read {tok_file}: {e}") from None
        cfg: dict = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"could not parse {cfg_file}: {e}") from None
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{cfg_file} must hold a JSON object")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                names = sorted(map(str, named))
                raise TokenizerError(f"{cfg_file} has chat templates {names} but none named 'default'")
            template = named["default"]
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"chat_template in {cfg_file} must be a string or a list of named templates")
        return cls(tok, bos_token=_token_str(cfg.get("bos_token")), eos_token=_token_str(cfg.get("eos_token")),
                   pad_token=_token_str(cfg.get("pad_token")), unk_token=_token_str(cfg.get("unk_token")),
                   add_bos_token=bool(cfg.get("add_bos_token", False)), chat_template=template)

    # ---- vocabulary -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token``, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    # ---- encode / decode --------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes a token stands for, also when they are part of a UTF-8 character (which `decode` shows as
        U+FFFD): a byte-level BPE's symbols mapped back to bytes, a byte-fallback piece ``<0xAB>`` as its byte,
        else the piece's UTF-8 with SentencePiece's ``▁`` as a space; special tokens as their text. None for an id
        the vocabulary does not have."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return None
        if token_id in self._special_ids():
            return piece.encode("utf-8")
        if type(self._tok.decoder).__name__ == "ByteLevel" and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        """A special token (decode with skip_special_tokens leaves it out)."""
        return token_id in self._special_ids()

    def _special_ids(self) -> frozenset[int]:
        if not hasattr(self, "_specials"):
            self._specials = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        return self._specials

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings in the text (e.g. ``<bos>``) map to their ids.

        With ``add_special_tokens`` the tokenizer.json post-processor runs (whatever it adds), and then bos is
        prepended if tokenizer_config.json says ``add_bos_token`` and the ids don't already start with it.
        (transformers v5 ignores ``add_bos_token`` when tokenizer.json exists; for tokenizers whose post-processor
        adds bos, as Gemma's and ``train_bpe``'s do, both give the same ids.)
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:                             # (the library refuses a lone surrogate, e.g. JSON "\ud800")
            raise TokenizerError("the text is not valid Unicode (it holds a lone surrogate)") from None
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, or anything iterable of ints such as a 1-D tensor)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a plain-text prompt: special tokens added, and bos in front if the tokenizer did not add it."""
        ids = self.encode(text, add_special_tokens=True)
        bos = self.bos_token_id
        if bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def chat_eos(self, eos: list[int] | None) -> list[int]:
        """The ids that end a chat reply: the model's `eos` plus this tokenizer's `<end_of_turn>`, if it has one."""
        out = list(eos or [])
        end_turn = self.token_to_id("<end_of_turn>")
        return out + ([end_turn] if end_turn is not None and end_turn not in out else [])

    # ---- chat -------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **extra: Any) -> str | list[int]:
        """Render ``messages`` with the chat template (as transformers does); token ids if ``tokenize``.

        ``extra`` becomes template variables (``tools``, ``documents``, ``enable_thinking``, ...). Tokenized
        output does not add special tokens again: the template itself writes bos.
        """
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (no chat_template.jinja and none in "
                                 "tokenizer_config.json)")
        messages = _check_messages(messages)
        if self._compiled is None or self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, _compile_template(self.chat_template))
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "unk_token": self.unk_token}
        variables = {**{k: v for k, v in tokens.items() if v is not None}, "tools": None, "documents": None, **extra}
        try:
            text = self._compiled[1].render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template error: {e.message or e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as e:
            # (a template that cannot take these messages or variables: e.g. a number where it calls a function)
            raise TokenizerError(f"chat template error: {type(e).__name__}: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


def train_bpe(files: list[str | Path], vocab_size: int, out_dir: str | Path, *,
              special_tokens: list[str] | None = None, min_frequency: int = 2,
              model_max_length: int = 8192) -> Tokenizer:
    """Train a byte-level BPE on plain-text ``files`` and save it (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) in ``out_dir``.

    Special tokens get the first ids, in order (default: pad=0, eos=1, bos=2, unk=3, mask=4, start_of_turn=5,
    end_of_turn=6); then the 256 byte symbols, then merges up to ``vocab_size``. If ``<bos>`` is among the
    specials, the saved post-processor prepends it (``encode(..., add_special_tokens=True)``, here and in HF).
    """
    files = [Path(f) for f in files]
    if not files:
        raise TokenizerError("train_bpe needs at least one text file")
    for f in files:
        if not f.is_file():
            raise TokenizerError(f"training file not found: {f}")
    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    base = len(specials) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < base:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: the specials and 256 byte symbols need {base}")

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stdout.isatty())     # (it writes blank lines to a pipe)
    try:
        tok.train([str(f) for f in files], trainer)
    except Exception as e:                    # the Rust side names no file: find it
        if "UTF-8" not in str(e):
            raise
        for f in files:
            try:
                Path(f).read_bytes().decode("utf-8")
            except UnicodeDecodeError as u:
                raise TokenizerError(f"{f}: not UTF-8 text (byte {u.object[u.start]:#04x} at offset {u.start})") \
                    from None
        raise TokenizerError(f"a training file is not UTF-8 text ({e})") from None
    if "<bos>" in specials:  # bos comes from the post-processor: transformers v5 ignores add_bos_token here
        bos = ("<bos>", tok.token_to_id("<bos>"))
        tok.post_processor = processors.TemplateProcessing(
            single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[bos])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
                           "add_eos_token": False, "model_max_length": model_max_length,
                           "clean_up_tokenization_spaces": False}
    for key, name in [("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"),
                      ("unk_token", "<unk>"), ("mask_token", "<mask>")]:
        if name in specials:
            cfg[key] = name
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return Tokenizer.from_dir(out)
