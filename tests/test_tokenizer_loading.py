
import pytest

from tokenizer import ORIGINAL_TOKENIZER_FIXTURE, load_tokenizer, tokenizer_fingerprint

FIXTURE = ORIGINAL_TOKENIZER_FIXTURE


def test_fixture_tokenizer_loads_and_fingerprint_is_stable():
    tok = load_tokenizer(FIXTURE)
    assert tok.eos_token_id == 2
    fp1 = tokenizer_fingerprint(tok)
    fp2 = tokenizer_fingerprint(load_tokenizer(FIXTURE))
    assert fp1 == fp2 and len(fp1) == 16


def test_missing_tokenizer_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
