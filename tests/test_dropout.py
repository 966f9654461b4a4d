import numpy as np
import pytest
import torch
from torch import nn

from mlflow_tabcons.members.dropout import FastDropout, fast_dropout
from mlflow_tabcons.members.training import EnsembleTrainer, TrainSettings, encode
from mlflow_tabcons.members.batching import pad
from mlflow_tabcons.members.classifier import LoraSettings, build_classifier, load_base_model, load_tokenizer

SCALE = 65536 / (65536 - 6554)  # p = 0.1 rounded to 6554 / 65536


def test_drops_a_share_p_and_keeps_the_mean():
    x = torch.ones(400_000, requires_grad=True)
    out = FastDropout(0.1, np.random.default_rng(0)).train()(x)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.1) < 5 * np.sqrt(0.1 * 0.9 / x.numel())
    values = torch.unique(out.detach()).tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(SCALE)]
    assert abs(out.mean().item() - 1.0) < 0.01
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # the gradient goes through the same mask


def test_masks_repeat_with_the_seed_and_differ_between_seeds():
    x = torch.randn(8, 64, 48)

    def draw(seed):
        return FastDropout(0.3, np.random.default_rng(seed)).train()(x) != 0

    assert torch.equal(draw(4), draw(4))
    assert not torch.equal(draw(4), draw(5))


def test_keeps_the_input_dtype_and_is_the_identity_in_eval_mode_or_at_zero():
    x = torch.randn(16, 33, dtype=torch.bfloat16)  # 528 elements: not a multiple of four 16-bit draws per word
    out = FastDropout(0.5, np.random.default_rng(0)).train()(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert FastDropout(0.5, np.random.default_rng(0)).eval()(x) is x
    assert FastDropout(0.0, np.random.default_rng(0)).train()(x) is x


def test_fast_dropout_swaps_every_dropout_in_and_restores_the_originals():
    inner = nn.ModuleDict({"default": nn.Dropout(0.2)})
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Dropout(0.0), inner).train()
    originals = [model[1], model[2], inner["default"]]
    with fast_dropout(model, np.random.default_rng(0)):
        assert isinstance(model[1], FastDropout) and isinstance(inner["default"], FastDropout)
        assert model[1].p == 0.1 and inner["default"].p == 0.2
        assert model[2] is originals[1]  # p = 0 draws nothing: left alone
        model.eval()
    assert [model[1], model[2], inner["default"]] == originals
    assert not any(module.training for module in originals)  # eval() inside the block reaches the originals
    with pytest.raises(RuntimeError, match="boom"), fast_dropout(model, np.random.default_rng(0)):
        raise RuntimeError("boom")
    assert model[1] is originals[0] and inner["default"] is originals[2]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_tokenizer(tiny_model_dir), load_base_model(tiny_model_dir)


def test_attention_switch_gives_the_same_logits_and_switches_back(tiny):
    tokenizer, base = tiny
    classifier = build_classifier(base, 2, lora=LoraSettings(), seed=0).eval()
    ids, mask = pad(encode(tokenizer, ["age: 42. job: clerk.", "age: 7."], None, 64).input_ids)
    with torch.no_grad():
        sdpa = classifier(ids, mask)
        with classifier.attention("eager"):
            assert classifier.config._attn_implementation == "eager"
            eager = classifier(ids, mask)
    assert classifier.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_trained_member_comes_back_with_standard_dropout_and_attention(tiny, precision):
    tokenizer, base = tiny
    rows = encode(tokenizer, ["age: 42.", "age: 7.", "age: 24.", "age: 61."] * 2, np.array([0, 1] * 4), 64)
    seen = []
    trainer = EnsembleTrainer(base, 2, TrainSettings(epochs=2, batch_size=4, precision=precision), rows)
    original_logits = trainer._logits

    def spy(classifier, *args):
        seen.append((sum(isinstance(m, FastDropout) for m in classifier.modules()), classifier.config._attn_implementation))
        return original_logits(classifier, *args)

    trainer._logits = spy
    member = trainer.train_member(0)
    dropouts = sum(type(m) is nn.Dropout and m.p > 0 for m in member.classifier.modules())
    assert dropouts > 0 and not any(isinstance(m, FastDropout) for m in member.classifier.modules())
    assert member.classifier.config._attn_implementation == "sdpa"
    assert {count for count, _ in seen} == {dropouts}  # every training step ran with the fast masks
    assert {attention for _, attention in seen} == {"eager" if precision == "bfloat16" else "sdpa"}
