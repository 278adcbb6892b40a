"""Classification heads: logistic regression copied exactly, linear head training, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ember_train.models.heads import LinearHead, fit_linear_head, fit_logistic_regression


def blobs(n_per: int = 20, labels=("a", "b", "c"), dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_per * len(labels), dim)).astype(np.float32)
    y = []
    for k, label in enumerate(labels):
        x[k * n_per : (k + 1) * n_per, k] += 4.0
        y += [label] * n_per
    return x, y


@pytest.mark.parametrize("labels", [("a", "b", "c"), ("neg", "pos"), (3, 7)])
def test_logistic_regression_head_reproduces_sklearn(labels):
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(labels=labels)
    head = fit_logistic_regression(x, y, seed=0)
    clf = LogisticRegression(max_iter=1000, random_state=0).fit(x, y)
    assert head.labels == list(clf.classes_)
    test = np.random.default_rng(1).normal(size=(30, x.shape[1])).astype(np.float32) * 3
    np.testing.assert_allclose(head.predict_proba(test), clf.predict_proba(test), atol=1e-5)
    assert head.predict(test) == list(clf.predict(test))


def test_multi_label_head_predicts_label_sets():
    x, _ = blobs(labels=("a", "b", "c"))
    # Label sets: first blob {a}, second {a, b}, third {} (no label).
    y = [["a"]] * 20 + [["a", "b"]] * 20 + [[]] * 20
    head = fit_logistic_regression(x, y, multi_label=True)
    assert head.multi_label and head.labels == ["a", "b"]
    predicted = head.predict(x)
    accuracy = np.mean([sorted(p) == sorted(t) for p, t in zip(predicted, y, strict=True)])
    assert accuracy > 0.9
    assert head.predict_proba(x).shape == (60, 2)


def test_linear_head_learns_separable_data():
    x, y = blobs()
    torch.manual_seed(0)
    head = LinearHead(x.shape[1], ["a", "b", "c"])
    untrained = np.mean(np.array(head.predict(x)) == np.array(y))
    history = fit_linear_head(head, x, y, epochs=60, learning_rate=0.05, seed=0)
    assert history[-1] < history[0] / 3
    assert np.mean(np.array(head.predict(x)) == np.array(y)) > max(0.9, untrained)


def test_head_save_load_roundtrip(tmp_path):
    x, y = blobs(labels=(10, 20, 30))
    head = fit_logistic_regression(x, y)
    head.save(tmp_path / "head")
    loaded = LinearHead.load(tmp_path / "head")
    assert loaded.labels == [10, 20, 30] and loaded.kind == "logistic_regression"
    np.testing.assert_array_equal(loaded.predict_proba(x), head.predict_proba(x))
    with pytest.raises(FileNotFoundError, match="no classification head"):
        LinearHead.load(tmp_path)


def test_head_rejects_unsaveable_or_unknown_labels():
    with pytest.raises(ValueError, match="strings or integers"):
        LinearHead(4, [("a", 1), "b"])
    with pytest.raises(ValueError, match="at least 2"):
        LinearHead(4, ["only"])
    head = LinearHead(4, ["a", "b"])
    with pytest.raises(ValueError, match="'z' is not one of"):
        head.targets(["a", "z"])


def test_heads_take_tensors_without_numpy(monkeypatch):
    """A CUDA tensor has no NumPy view (``np.asarray`` raises): tensors must be moved, not converted.

    Seen on an H200: the SetFit pipeline's evaluation crashed in ``predict_proba``. Here every
    tensor refuses ``__array__`` the way a CUDA tensor does.
    """
    x, y = blobs(labels=("a", "b"))
    expected_head = fit_logistic_regression(x, y, seed=0)
    expected = expected_head.predict_proba(x)

    def no_numpy_view(self, dtype=None, copy=None):
        raise TypeError("can't convert this tensor to numpy")

    monkeypatch.setattr(torch.Tensor, "__array__", no_numpy_view)
    emb = torch.from_numpy(x)
    head = fit_logistic_regression(emb, y, seed=0)
    np.testing.assert_array_equal(head.predict_proba(emb), expected)
    assert head.predict(emb) == expected_head.predict(x)
    linear = LinearHead(x.shape[1], ["a", "b"])
    assert len(fit_linear_head(linear, emb, y, epochs=2)) == 2
