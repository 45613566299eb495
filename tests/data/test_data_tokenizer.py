import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.config import ConfigError
from moe.data.tokenizer import IGNORE_INDEX, ByteTokenizer, get_tokenizer, target_bytes


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_byte_roundtrip_any_bytes(data):
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == data


def test_invalid_utf8_and_str():
    tok = ByteTokenizer()
    bad = b"ok \xff\xfe \xc3( end"
    assert tok.decode(tok.encode(bad)) == bad
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.vocab_size == 259 and (tok.BOS, tok.EOS, tok.PAD) == (256, 257, 258)


def test_decode_drops_specials_and_accepts_tensors():
    tok = ByteTokenizer()
    ids = [tok.BOS, *b"ACGT", tok.EOS, tok.PAD]
    assert tok.decode(ids) == b"ACGT"
    assert tok.decode(torch.tensor(ids)) == b"ACGT"


def test_target_bytes_counts_only_real_bytes():
    tok = ByteTokenizer()
    y = torch.tensor([[65, 66, 257, 256], [67, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    assert target_bytes(y, tok.byte_lengths).tolist() == [2, 1]
    assert int(np.sum(tok.byte_lengths)) == 256


def test_get_tokenizer():
    assert isinstance(get_tokenizer(), ByteTokenizer)
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        get_tokenizer("/no/such/tokenizer")


def test_hf_tokenizer_without_transformers_is_a_clear_error(tmp_path):
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs the transformers package"):
            get_tokenizer(str(tmp_path))
    else:
        with pytest.raises(ConfigError, match="cannot load tokenizer"):
            get_tokenizer(str(tmp_path))
