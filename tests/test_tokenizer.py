import json
import random
import shutil

import pytest

from dgemma.tokenizer import CHAT_TEMPLATE, Tokenizer, TokenizerError, train_bpe

MESSAGES = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello, how can I help?"}]
RENDERED = ("<bos><start_of_turn>user\nHi there!<end_of_turn>\n"
            "<start_of_turn>model\nHello, how can I help?<end_of_turn>\n")
TEXT = "The quick brown fox,\njumps over the lazy dog.\n\n  Naïve café — 東京 😀\ttabs & \"quotes\" 42!"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world model user café naïve, and of to a".split()
    d = tmp_path_factory.mktemp("bpe")
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", "!", "?"]) for _ in range(300)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_bpe([d / "corpus.txt"], 300, d / "tok")
    return d / "tok"


@pytest.fixture
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def copy_without_jinja(tok_dir, dst):
    shutil.copytree(tok_dir, dst)
    (dst / "chat_template.jinja").unlink()
    return dst


def set_config(folder, **kv):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(kv)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_files_and_vocab(tok_dir, tok):
    assert {p.name for p in tok_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["bos_token"] == "<bos>" and "model_max_length" in cfg
    assert (tok_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert tok.vocab_size == 300


def test_special_token_ids(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    names = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    assert [tok.token_to_id(n) for n in names] == list(range(7))
    assert tok.token_to_id("<definitely-not-a-token>") is None


def test_round_trip(tok):
    ids = tok.encode(TEXT)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == TEXT
    assert tok.encode(TEXT, add_special_tokens=True) == [2] + ids
    assert tok.decode([2] + ids) == TEXT
    assert tok.decode([2] + ids, skip_special_tokens=False) == "<bos>" + TEXT
    assert tok.encode("<start_of_turn>user")[0] == 5  # special strings map to their ids


def test_chat_template_rendering(tok):
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == RENDERED
    assert tok.apply_chat_template(MESSAGES) == RENDERED + "<start_of_turn>model\n"
    ids = tok.apply_chat_template(MESSAGES, tokenize=True)
    assert ids == tok.encode(RENDERED + "<start_of_turn>model\n")
    assert ids[:2] == [2, 5] and ids.count(2) == 1


def test_template_from_config_string_and_list(tok_dir, tmp_path):
    folder = copy_without_jinja(tok_dir, tmp_path / "t")
    assert Tokenizer.from_dir(folder).chat_template is None
    set_config(folder, chat_template="[{{ messages[0]['content'] }}]")
    assert Tokenizer.from_dir(folder).apply_chat_template(MESSAGES) == "[Hi there!]"
    set_config(folder, chat_template=[{"name": "tool_use", "template": "tools"},
                                      {"name": "default", "template": "default:{{ bos_token }}"}])
    assert Tokenizer.from_dir(folder).apply_chat_template(MESSAGES) == "default:<bos>"


def test_jinja_file_wins(tok_dir, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tok_dir, folder)
    set_config(folder, chat_template="from config")
    assert Tokenizer.from_dir(folder).apply_chat_template(MESSAGES) == RENDERED + "<start_of_turn>model\n"


def test_extra_variables_and_filters(tok_dir, tmp_path):
    folder = copy_without_jinja(tok_dir, tmp_path / "t")
    set_config(folder, chat_template="{{ messages | tojson }}|{{ tools }}|{{ enable_thinking }}|"
                                     "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                                     "{{ m.role }}{% endfor %}|{{ strftime_now('%Y') | length }}")
    out = Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "café <b>"}],
                                                         enable_thinking=True)
    assert out == '[{"role": "user", "content": "café <b>"}]|None|True|user|4'


def test_no_template(tok_dir, tmp_path):
    folder = copy_without_jinja(tok_dir, tmp_path / "t")
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(folder).apply_chat_template(MESSAGES)


def test_missing_or_bad_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="could not read"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("messages", [
    [], "hello", [{"role": "user"}], [{"content": "hi"}], [{"role": "user", "content": 3}],
    [{"role": None, "content": "hi"}], ["not a dict"],
])
def test_bad_messages(tok, messages):
    with pytest.raises(TokenizerError):
        tok.apply_chat_template(messages)


def test_raise_exception_in_template(tok_dir, tmp_path):
    folder = copy_without_jinja(tok_dir, tmp_path / "t")
    set_config(folder, chat_template="{% if messages[0]['role'] != 'system' %}"
                                     "{{ raise_exception('first message must be system') }}{% endif %}ok")
    with pytest.raises(TokenizerError, match="first message must be system"):
        Tokenizer.from_dir(folder).apply_chat_template(MESSAGES)
    set_config(folder, chat_template="{% if %}")
    with pytest.raises(TokenizerError, match="syntax error"):
        Tokenizer.from_dir(folder).apply_chat_template(MESSAGES)
    # a variable the template cannot use (a client's chat_template_kwargs): an error about the template, not a crash
    set_config(folder, chat_template="{{ enable_thinking() }}{{ 1 // level }}{{ options | length }}")
    for extra in ({"enable_thinking": 1}, {"enable_thinking": dict, "level": 0}, {"enable_thinking": dict,
                                                                                 "level": 1, "options": 3}):
        with pytest.raises(TokenizerError, match="chat template error"):
            Tokenizer.from_dir(folder).apply_chat_template(MESSAGES, **extra)


def test_train_bpe_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        train_bpe([tmp_path / "missing.txt"], 300, tmp_path / "out")
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe([tmp_path / "a.txt"], 100, tmp_path / "out")


def test_matches_transformers(tok_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ours = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == ours
    hf_ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids  # v5 returns a BatchEncoding
    assert list(hf_ids) == tok.apply_chat_template(MESSAGES, tokenize=True)
    assert hf(TEXT)["input_ids"] == tok.encode(TEXT, add_special_tokens=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, 1, 0)
    assert hf.decode(tok.encode(TEXT), skip_special_tokens=True) == TEXT


def test_token_bytes_rebuild_the_text(tok):
    ids = tok.encode(TEXT)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)            # pieces of multi-byte characters
    assert b"".join(tok.token_bytes(i) for i in ids) == TEXT.encode("utf-8")
    assert tok.token_bytes(2) == b"<bos>" and tok.token_bytes(10 ** 6) is None


def test_token_bytes_of_a_byte_fallback_sentencepiece_vocabulary():
    """Gemma's own tokenizer style: SentencePiece pieces with U+2581 for spaces, <0xAB> pieces for bytes."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models
    vocab = {"<pad>": 0, "<eos>": 1, "<0xC3>": 2, "<0xA9>": 3, "\u2581caf": 4, "\u2581ok": 5}
    hf = HFTokenizer(models.BPE(vocab, [], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(["<eos>"])
    t = Tokenizer(hf)
    assert [t.token_bytes(i) for i in range(1, 6)] == [b"<eos>", b"\xc3", b"\xa9", b" caf", b" ok"]
    assert b"".join(t.token_bytes(i) for i in (4, 2, 3, 5)).decode("utf-8") == t.decode([4, 2, 3, 5]) == " café ok"
