"""Batch sizes that fit the device: the budget sized from free CUDA memory, and the retry after running out."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from mlflow_tabcons.errors import TabconsResourceError
from mlflow_tabcons.members.classifier import LoraSettings, build_classifier, load_base_model, load_tokenizer
from mlflow_tabcons.members.training import encode
from mlflow_tabcons.scoring import memory
from mlflow_tabcons.scoring.consistency import ConsistencyScorer, ScorerSettings, TorchBackend
from test_consistency import ROWS, RecordingBackend

GIB = 2**30


class OutOfMemoryAbove:
    """Wraps a backend: a forward pass over more than ``limit`` padded tokens raises CUDA's out-of-memory error."""

    def __init__(self, backend, limit: int):
        self.backend, self.limit = backend, limit
        self.refused: list[int] = []
        self.passes: list[int] = []

    def embed(self, input_ids):
        return self.backend.embed(input_ids)

    def probabilities(self, embeddings, attention_mask):
        if attention_mask.numel() > self.limit:
            self.refused.append(attention_mask.numel())
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        self.passes.append(attention_mask.numel())
        return self.backend.probabilities(embeddings, attention_mask)


def _fake_cuda(monkeypatch, free_bytes: int) -> list:
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return free_bytes, 2 * free_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


def _assert_same_scores(a, b):
    np.testing.assert_array_equal(a.predicted, b.predicted)
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.certified, b.certified)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    np.testing.assert_allclose(a.consistency, b.consistency, atol=1e-6)
    np.testing.assert_allclose(a.lcb, b.lcb, atol=1e-6)


def test_the_budget_is_sized_from_free_cuda_memory_and_the_model(monkeypatch):
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_hidden_layers=30)
    asked = _fake_cuda(monkeypatch, 4 * GIB)
    per_token = 4 * 576 + 4 * (6 * 576 + 3 * 1536 + 2 * 9 * 200)
    assert memory.bytes_per_token(config, "float32", 200) == per_token
    assert memory.token_budget(config, "cuda:0", "float32", 200) == int(0.8 * 4 * GIB) // per_token
    assert asked == [torch.device("cuda:0")]
    # bfloat16 activations take half the bytes, so about twice the tokens fit
    assert memory.token_budget(config, "cuda", "bfloat16", 200) > 1.8 * memory.token_budget(config, "cuda", "float32", 200)
    # longer rows cost more per token (the attention scores), a wider model more still
    assert memory.token_budget(config, "cuda", "float32", 1000) < memory.token_budget(config, "cuda", "float32", 200)
    wide = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32)
    assert memory.token_budget(wide, "cuda", "float32", 200) < memory.token_budget(config, "cuda", "float32", 200) / 3


def test_the_sized_budget_is_capped_and_never_below_one_pass(monkeypatch):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    _fake_cuda(monkeypatch, 140 * GIB)
    assert memory.token_budget(config, "cuda", "float32", 100) == memory.MAX_SIZED_TOKENS
    _fake_cuda(monkeypatch, 1000)
    assert memory.token_budget(config, "cuda", "float32", 100) == 100


def test_the_cpu_keeps_the_default_budget_without_asking_cuda(monkeypatch):
    asked = _fake_cuda(monkeypatch, GIB)
    assert memory.token_budget(LlamaConfig(), "cpu", "float32", 100) == memory.DEFAULT_BATCH_TOKENS
    assert asked == []


def test_the_scorer_packs_to_the_backends_budget_unless_the_user_set_one():
    class SizedBackend(RecordingBackend):
        def token_budget(self, longest):
            self.longest = longest
            return 10

    sized = SizedBackend()
    ConsistencyScorer(sized, ScorerSettings(k=8)).score(ROWS)
    assert sized.longest == 5
    assert max(mask.numel() for _, mask in sized.calls) <= 10
    explicit = SizedBackend()
    ConsistencyScorer(explicit, ScorerSettings(k=8, max_batch_tokens=40)).score(ROWS)
    assert not hasattr(explicit, "longest")
    assert max(mask.numel() for _, mask in explicit.calls) > 10


def test_a_batch_that_runs_out_of_memory_is_halved_and_retried_with_the_same_scores():
    settings = ScorerSettings(k=20, sigma=0.5, seed=3, max_batch_tokens=64)
    plain = ConsistencyScorer(RecordingBackend(), settings).score(ROWS)
    backend = OutOfMemoryAbove(RecordingBackend(), limit=12)
    retried = ConsistencyScorer(backend, settings).score(ROWS)
    assert backend.refused and max(backend.passes) <= 12
    _assert_same_scores(plain, retried)


def test_early_stopping_rounds_keep_their_scores_through_retries():
    rows = [torch.tensor([i, i + 1, i + 2]) for i in range(0, 45, 3)]
    settings = ScorerSettings(k=128, sigma=1.0, bound="betting", early_stop=True, max_batch_tokens=4096)
    plain = ConsistencyScorer(RecordingBackend(), settings).score(rows)
    backend = OutOfMemoryAbove(RecordingBackend(), limit=100)
    retried = ConsistencyScorer(backend, settings).score(rows)
    assert backend.refused
    _assert_same_scores(plain, retried)


def test_retries_on_a_real_tiny_llama_give_the_same_scores(tiny_dirs):
    model_dir = tiny_dirs["llama"]
    classifier = build_classifier(load_base_model(model_dir), 2, lora=LoraSettings(), seed=0, head="linear")
    tokenizer = load_tokenizer(model_dir, "decoder")
    texts = ["Age is 42. Job is clerk. Answer:", "Age is 7. Answer:", "Glucose is 148. Mass is 33.6. Answer:"]
    rows = encode(tokenizer, texts, None, 64).input_ids
    settings = ScorerSettings(k=12, sigma=0.3, max_batch_tokens=4096)
    plain = ConsistencyScorer(TorchBackend(classifier), settings).score(rows)
    backend = OutOfMemoryAbove(TorchBackend(classifier), limit=3 * max(len(r) for r in rows))
    retried = ConsistencyScorer(backend, settings).score(rows)
    assert backend.refused
    _assert_same_scores(plain, retried)
    np.testing.assert_allclose(ConsistencyScorer(backend, settings).predict_proba(rows), plain.probabilities, atol=1e-6)


def test_a_single_pass_that_does_not_fit_is_refused_with_what_to_change():
    backend = OutOfMemoryAbove(RecordingBackend(), limit=2)
    with pytest.raises(TabconsResourceError, match="one forward pass of 3 tokens does not fit.*max_length") as caught:
        ConsistencyScorer(backend, ScorerSettings(k=4)).score(ROWS)
    assert caught.value.get_http_status_code() == 429
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


def test_other_errors_are_not_retried():
    class Broken(RecordingBackend):
        def probabilities(self, embeddings, attention_mask):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        ConsistencyScorer(Broken(), ScorerSettings(k=4)).score(ROWS)
