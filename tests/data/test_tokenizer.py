from megatron_lcl.data.tokenizer import LCLTokenizer, train_tokenizer
from data_helpers import synthetic_mmc4, tokenizer_path  # noqa: F401 (fixtures)


def test_special_ids_are_fixed(tokenizer_path):
    tok = LCLTokenizer(tokenizer_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id, tok.image_id) == (0, 2, 3, 4, 5, 6)
    assert tok.vocab_size > 7


def test_text_cannot_produce_image_tokens(tokenizer_path):
    tok = LCLTokenizer(tokenizer_path)
    ids = tok.encode("a red circle <img> <BoI> <EoI> </s> <pad>")
    assert not set(ids) & {tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id, tok.image_id}


def test_roundtrip_and_image_rendering(tokenizer_path):
    tok = LCLTokenizer(tokenizer_path)
    text = "We saw a large red circle on a striped background."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    shown = tok.decode([tok.bos_id] + ids + [tok.boi_id, tok.image_id, tok.eoi_id, tok.pad_id])
    assert shown.endswith("<BoI> <img> <EoI>") and "background." in shown


def test_tiny_vocab_trains(tmp_path):
    path = train_tokenizer(["hello world", "a blue square", "hello blue world"] * 50, str(tmp_path / "t"), 1000)
    tok = LCLTokenizer(path)
    assert tok.decode(tok.encode("hello blue square")) == "hello blue square"
    assert (tmp_path / "t.vocab").exists()


def test_train_tokenizer_cli(tmp_path, synthetic_mmc4, capsys):

    import train_tokenizer as cli

    cli.main(["--format", "mmc4", "--input", synthetic_mmc4, "--output", str(tmp_path / "tok" / "lcl"),
              "--vocab-size", "256"])
    assert "<BoI> 4" in capsys.readouterr().out
    tok = LCLTokenizer(str(tmp_path / "tok" / "lcl.model"))
    assert tok.decode(tok.encode("a red circle")) == "a red circle"


def test_rare_characters_round_trip(tmp_path):
    path = train_tokenizer(["a blue square on a red background"] * 200 + ["Until"], str(tmp_path / "t"), 1024,
                           byte_fallback=True)
    tok = LCLTokenizer(path)
    text = "Until 東京 – a blue square ü"
    assert tok.decode(tok.encode(text)) == text
