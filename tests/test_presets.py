import pytest
import torch

from alignclip.presets import PRESETS, load_clip
from alignclip.storage import parse_uri


def test_tiny_builds_and_encodes(tiny):
    tokens = tiny.tokenizer(["a photo of the digit zero.", "a photo of the digit one."])
    text = tiny.model.encode_text(tokens)
    image = tiny.model.encode_image(torch.randn(3, 3, tiny.image_size, tiny.image_size))
    assert text.shape == (2, 64) and image.shape == (3, 64)
    assert torch.isfinite(text).all() and torch.isfinite(image).all()
    assert len(tiny.model.visual.transformer.resblocks) == 6


def test_local_checkpoint_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = load_clip("tiny", pretrained=str(path))
    for (name, a), (_, b) in zip(tiny.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "ViT-B-16.pt"
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope/ViT-B-16.pt"):
        load_clip("tiny", pretrained=str(missing))


@pytest.mark.parametrize("uri", ["s3://", "s3://bucket", "s3://bucket/", "s3://bucket/dir/"])
def test_bad_s3_uri_is_a_clear_error(uri):
    with pytest.raises(ValueError, match="bad S3 URI"):
        load_clip("tiny", pretrained=uri)


def test_parse_s3_uri():
    assert parse_uri("s3://models/clip/ViT-B-16.pt") == ("models", "clip/ViT-B-16.pt")
    # dataset folders: the prefix of every key below it, or the whole bucket
    assert parse_uri("s3://data/pacs", prefix=True) == ("data", "pacs/")
    assert parse_uri("s3://data/pacs/art/", prefix=True) == ("data", "pacs/art/")
    assert parse_uri("s3://data", prefix=True) == ("data", "")
    with pytest.raises(ValueError, match="bad S3 prefix"):
        parse_uri("s3:///pacs", prefix=True)
    with pytest.raises(ValueError, match="not an s3:// URI: '/models/a.pt'"):
        parse_uri("/models/a.pt")


def test_unknown_model_lists_presets():
    with pytest.raises(ValueError, match="tiny"):
        load_clip("no-such-model")


def test_offline_pretrained_tag_says_how_to_provide_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="(?s)offline.*file path.*s3://"):
        load_clip("vit-b-32")
    assert PRESETS["vit-b-16"].pretrained == "openai"


def test_random_weights_are_the_same_in_every_stage():
    """Without pretrained weights the model is drawn under a fixed seed, and the caller's RNG is left alone."""
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_clip("tiny")
    after = torch.rand(1)
    b = load_clip("tiny")
    assert torch.equal(before, after)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def save_openai_layout(model, path, logit_scale: float) -> None:
    """A CLIP's weights the way OpenAI's CLIP stores them: the same key names as open_clip's CLIP (`visual.*`, the
    text tower's `transformer.*`, `token_embedding`, `positional_embedding`, `ln_final`, `text_projection`,
    `logit_scale`), weight matrices and projections in half precision as OpenAI's `convert_weights` leaves
    them, `logit_scale` in float32."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["logit_scale"] = torch.tensor(logit_scale, dtype=torch.float32)
    for key, value in state.items():
        if key != "logit_scale" and value.is_floating_point() and (value.ndim >= 2 or key.endswith(("in_proj_bias", ".bias"))):
            state[key] = value.half()
    torch.save(state, path)


def test_tau_is_read_from_the_loaded_weights(tiny, tmp_path):
    """tau = 1 / exp(logit_scale) of the weights actually loaded: the tiny preset's digits pre-training
    (logit scale about 13.8, tau about 0.073) and OpenAI-layout weights with OpenAI's logit scale ln 100 (0.01)."""
    import math

    from alignclip import pretrain

    cached = torch.load(pretrain.cached_weights(), weights_only=True)
    assert tiny.tau == pytest.approx(1.0 / math.exp(float(cached["logit_scale"])), rel=1e-6)
    assert tiny.tau == pytest.approx(0.073, abs=0.002) and 1.0 / tiny.tau == pytest.approx(13.8, abs=0.2)
    path = tmp_path / "openai-layout.pt"
    save_openai_layout(tiny.model, path, math.log(100.0))
    openai = load_clip("tiny", pretrained=str(path))
    assert openai.tau == pytest.approx(0.01, rel=1e-6)
    assert float(openai.model.logit_scale.detach()) == pytest.approx(math.log(100.0))
    # and a third value, so neither number above can be a constant the loader falls back to
    save_openai_layout(tiny.model, path, math.log(25.0))
    assert load_clip("tiny", pretrained=str(path)).tau == pytest.approx(0.04, rel=1e-6)
