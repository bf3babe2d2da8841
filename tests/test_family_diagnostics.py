"""The family hooks the lab's diagnostics ask (issue 26): FFN modules per layer, and the sentence
representation a downstream head reads, so the probe and layer scan name no architecture."""

import torch

from recipe_dist.config import RunConfig
from recipe_dist.models import get_family


def test_ffn_modules_name_both_linears_of_every_layer(tiny_bert_dir):
    family = get_family("bert")
    loaded = family.load(tiny_bert_dir, RunConfig())
    ffn = family.ffn_modules(loaded.model)
    assert sorted(ffn) == [0, 1]
    state = loaded.model.state_dict()
    for layer, modules in ffn.items():
        assert [m.rsplit(".", 2)[-2:] for m in modules] == [["intermediate", "dense"], ["output", "dense"]]
        assert all(f"{m}.weight" in state and f"{m}.bias" in state for m in modules)
        assert f".layer.{layer}." in modules[0] and state[f"{modules[0]}.weight"].shape[0] == 64  # FFN-in: width -> 64


def test_classifier_features_and_head_reproduce_the_classifier(tiny_bert_dir):
    family = get_family("bert")
    model, tokenizer = family.build_classifier(tiny_bert_dir, ["0", "1"], RunConfig())
    model.eval()
    enc = dict(tokenizer(["alpha beta", "gamma"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        feats = family.classifier_features(model, enc)
        assert feats.shape == (2, model.config.hidden_size)
        assert torch.allclose(family.classify_features(model, feats), model(**enc).logits, atol=1e-6)
        # Any feature vector goes through the same head (the probe scores the target corner this way).
        corner = torch.tanh(torch.full((1, model.config.hidden_size), 10.0))
        assert torch.allclose(family.classify_features(model, corner), model.classifier(corner), atol=1e-6)
