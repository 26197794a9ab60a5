import pytest
from tokenizers import Tokenizer

from angle_rt.prompts import PROMPTS
from angle_rt.tokenizer import CHARS_PER_TOKEN_CAP, TextTokenizer
from exporters.texts import verification_texts


@pytest.fixture(scope="module")
def hf_tok(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def tok(minilm_dir):
    return TextTokenizer(minilm_dir / "tokenizer.json", max_length=64)


def test_matches_transformers_with_truncation(tok, hf_tok, stsb_test):
    texts = stsb_test.sentences[:600] + verification_texts(None)[-40:]
    ref = hf_tok(texts, truncation=True, max_length=64)["input_ids"]
    assert tok.encode(texts) == ref
    assert max(len(r) for r in ref) == 64  # long texts were truncated


def test_model_padding_in_tokenizer_json_is_ignored(minilm_dir):
    # MiniLM's tokenizer.json pads to a fixed 128: mean pooling would average pads.
    raw = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    assert raw.padding is not None and raw.encode("hi").ids[-1] == 0
    ids = TextTokenizer(minilm_dir / "tokenizer.json", 256).encode(["hi there"])[0]
    assert len(ids) == 4 and ids[0] == 101 and ids[-1] == 102


def test_prompt_applied_like_format(tok, hf_tok):
    texts = ["A man plays a guitar.", "", "Où est la gare ?"]
    template = PROMPTS["C"]
    ref = hf_tok([template.format(text=t) for t in texts], truncation=True, max_length=64)
    assert tok.encode(texts, template) == ref["input_ids"]


@pytest.mark.parametrize("name", ["A", "C"])
def test_prompt_kept_when_text_is_truncated(tok, hf_tok, name):
    template = PROMPTS[name]
    long_text = " ".join(verification_texts(None)[-3:])
    ids = tok.encode([long_text], template)[0]
    assert len(ids) == 64
    head, _, tail = template.partition("{text}")
    head_ids = hf_tok(head, add_special_tokens=False)["input_ids"]
    tail_ids = hf_tok(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    assert ids[1:1 + len(head_ids)] == head_ids
    assert ids[len(ids) - 1 - len(tail_ids):-1] == tail_ids
    # the kept text is the start of the sentence
    text_ids = hf_tok(long_text, add_special_tokens=False)["input_ids"]
    n_text = 64 - 2 - len(head_ids) - len(tail_ids)
    assert ids[1 + len(head_ids):1 + len(head_ids) + n_text] == text_ids[:n_text]


def test_prompt_longer_than_max_length_is_refused(minilm_dir):
    tok = TextTokenizer(minilm_dir / "tokenizer.json", max_length=8)
    with pytest.raises(ValueError, match="leaves no room"):
        tok.encode(["some text here"], PROMPTS["C"])


def test_prompt_that_fills_max_length_is_refused(minilm_dir):
    """A prompt leaving exactly no room once cut every text away: one vector for all."""
    words = "word " * 10
    raw = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    raw.no_padding()
    n = len(raw.encode(words).ids)
    tok = TextTokenizer(minilm_dir / "tokenizer.json", max_length=n)  # the prompt + 2 specials
    with pytest.raises(ValueError, match="leaves no room"):
        tok.encode(["some text here", "other"], words + "{text}")
    assert len(TextTokenizer(minilm_dir / "tokenizer.json", n + 1).encode(
        ["some text here"], words + "{text}")[0]) == n + 1


def test_huge_text_is_capped_before_tokenizing(tok):
    words = " ".join(verification_texts(None)[-40:])
    huge = (words + " ") * (5_000_000 // len(words) + 1)
    assert len(huge) > 5_000_000
    ids = tok.encode([huge])[0]
    assert ids == tok.encode([huge[: 64 * CHARS_PER_TOKEN_CAP]])[0]
    assert len(ids) == 64


@pytest.mark.parametrize("template", [None, PROMPTS["C"]])
def test_cap_never_drops_tokens_the_row_has_room_for(tok, hf_tok, template):
    # the character cap assumes < 32 characters a token; text spread out by runs of
    # whitespace once lost its content past the cap (the row of "" for 20,000 spaces + a
    # sentence): what the cap cuts must only ever be tokens truncation would drop
    words = verification_texts(None)[-3:]
    texts = [" " * 20_000 + "A man is playing a guitar.",
             "Short." + "\n" * 30_000 + words[1],
             (" " * 90).join(" ".join(words).split()),  # > 64 tokens over ~30,000 chars
             words[2]]
    assert all(len(t) > 64 * CHARS_PER_TOKEN_CAP for t in texts[:3])
    prompted = [template.format(text=t) for t in texts] if template else texts
    ref = hf_tok(prompted, truncation=True, max_length=64)["input_ids"]
    assert tok.encode(texts, template) == ref
    assert [tok.encode([t], template)[0] for t in texts] == ref
    assert len(ref[2]) == 64 and len(ref[0]) < 64  # one truncated, one not
    assert len(tok.window(texts[2])) < len(texts[2])  # a prefix fills the row
    assert tok.window(texts[0]) == texts[0]  # all of it: its tokens fit


def test_cap_cutting_a_word_never_changes_the_kept_tokens(tok, hf_tok):
    """Where no space lies near the cap the cut falls inside a word, which tokenizes
    otherwise than whole (a word over 100 characters is one [UNK]; a part of it, word
    pieces) and once reached the kept tokens: such a row counts only once twice the text
    gives it too."""
    texts = [("q" * n + ".") * (4 * 64 * CHARS_PER_TOKEN_CAP // n) for n in range(101, 200, 7)]
    texts.append("中文" * 3_000)  # no spaces at all
    assert tok.encode(texts) == hf_tok(texts, truncation=True, max_length=64)["input_ids"]


def test_empty_input(tok):
    assert tok.encode([]) == []
    assert tok.encode([""]) == [[101, 102]]


@pytest.mark.parametrize("template", [None, PROMPTS["C"]])
def test_one_text_tokenizes_as_in_a_batch(tok, stsb_test, template):
    # a lone text skips the Rust thread pool (the server's one-sentence requests); its ids
    # must be the ones the same text gets inside a batch
    texts = [*stsb_test.sentences[:200], " ".join(verification_texts(None)[-3:]), ""]
    batched = tok.encode(texts, template)
    assert [tok.encode([t], template)[0] for t in texts] == batched
    assert max(len(r) for r in batched) == 64


def test_one_unencodable_text_is_refused_like_a_batch(tok):
    for texts in (["lone \udc80 surrogate"], ["fine", "lone \udc80 surrogate"]):
        with pytest.raises(ValueError, match="surrogate"):
            tok.encode(texts)
