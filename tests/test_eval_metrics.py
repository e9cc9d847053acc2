"""Metric checks against small hand-computed cases (issue 5, SPEC §6)."""

import numpy as np
import pytest

from eval.compositionality import pair_similarity, sugarcrepe_accuracy, winoground_scores
from eval.linear_probe import linear_probe
from eval.metrics import chance_recall, class_prototypes, classification_metrics, retrieval_metrics
from eval.ranking import RankingBackendError, topk

# 3 images x 4 texts; with image_emb = I, text_emb = S.T, the scores are exactly S.
S = np.array([[0.9, 0.1, 0.5, 0.2],
              [0.8, 0.3, 0.7, 0.6],
              [0.1, 0.2, 0.3, 0.4]])
PAIRS = np.array([[0, 0], [0, 1], [1, 2], [2, 3]])  # image 0 has two captions


def test_retrieval_recall_hand_computed():
    out = retrieval_metrics(np.eye(3), S.T.copy(), PAIRS, ks=(1, 2, 3), backend="torch")
    m, c = out.metrics, out.chance
    # image->text: img0 top t0 (hit); img1 t0,t2 (hit at 2); img2 t3 (hit)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0
    # text->image: t0 -> img0 rank 1; t1 -> img0 rank 3; t2 -> img1 rank 1; t3 -> img2 rank 2
    assert m["image_retrieval_recall@1"] == 0.5
    assert m["image_retrieval_recall@2"] == 0.75
    assert m["image_retrieval_recall@3"] == 1.0
    # chance i->t: img0 has 2 of 4 texts: 1/2, 5/6, 1; others 1/4, 2/4, 3/4
    assert c["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert c["text_retrieval_recall@2"] == pytest.approx(11 / 18)
    assert c["text_retrieval_recall@3"] == pytest.approx(5 / 6)
    assert c["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert c["image_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert out.counts == {"n_images": 3, "n_texts": 4, "n_pairs": 4, "n_image_queries": 3, "n_text_queries": 4}
    assert out.i2t_topk.tolist()[1] == [0, 2, 3]


def test_chance_is_k_over_n_with_one_positive():
    assert chance_recall(np.ones(7, int), 20, (1, 5, 10)) == pytest.approx({1: 1 / 20, 5: 5 / 20, 10: 10 / 20})


def test_ties_broken_by_lower_index_on_both_backends():
    q = np.array([[1.0, 0.0]])
    keys = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    for backend in ("torch", "faiss"):
        assert topk(q, keys, 4, backend).tolist() == [[1, 2, 3, 0]]
    # the positive text 2 ties with text 1 at the top: index order puts it second
    out = retrieval_metrics(q, keys, np.array([[0, 2]]), ks=(1, 2), backend="torch")
    assert out.metrics["text_retrieval_recall@1"] == 0.0
    assert out.metrics["text_retrieval_recall@2"] == 1.0


def test_torch_and_faiss_rankings_identical():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3000, 32)).astype(np.float32)
    keys[1500:1600] = keys[:100]  # exact duplicates: ties everywhere
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = np.concatenate([keys[:50], rng.standard_normal((150, 32)).astype(np.float32)])
    a = topk(queries, keys, 10, "torch")
    b = topk(queries, keys, 10, "faiss")
    np.testing.assert_array_equal(a, b)
    assert (a[:50, 0] == np.arange(50)).all() and (a[:50, 1] == np.arange(1500, 1550)).all()


def test_class_prototypes_normalize_average_renormalize():
    p = class_prototypes(np.array([[[3.0, 4.0], [0.0, 2.0]]]))
    np.testing.assert_allclose(p, [[0.3 / np.sqrt(0.9), 0.9 / np.sqrt(0.9)]], rtol=1e-6)


def test_classification_hand_computed():
    scores = np.array([[0.9, 0.1, 0.2, 0.3, 0.4, 0.5],   # label 0: top-1 hit
                       [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],   # label 1: rank 2
                       [0.9, 0.8, 0.1, 0.7, 0.6, 0.5],   # label 2: rank 6
                       [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]])  # label 2: tie -> rank 3 by index
    out = classification_metrics(scores, np.array([0, 1, 2, 2]))
    assert out.metrics == {"acc1": 0.25, "acc5": 0.75, "mean_per_class_recall": pytest.approx(1 / 3)}
    assert out.chance == {"acc1": pytest.approx(1 / 6), "acc5": pytest.approx(5 / 6),
                          "mean_per_class_recall": pytest.approx(1 / 6)}
    assert out.predictions.tolist() == [0, 0, 0, 0]
    assert out.confusion[:, 0].tolist() == [1, 1, 2, 0, 0, 0]
    assert out.counts == {"n_images": 4, "n_classes": 6, "n_classes_present": 3}


def test_classification_no_acc5_below_five_classes():
    out = classification_metrics(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
    assert out.metrics == {"acc1": 0.5, "mean_per_class_recall": 0.5}


def test_winoground_scores_hand_computed():
    sim = np.array([[[0.9, 0.1], [0.2, 0.8]],   # all correct
                    [[0.5, 0.6], [0.1, 0.7]],   # text yes, image no (caption 0 prefers image 1)
                    [[0.5, 0.5], [0.5, 0.5]]])  # ties fail
    assert winoground_scores(sim) == pytest.approx({"text_score": 2 / 3, "image_score": 1 / 3, "group_score": 1 / 3})


def test_sugarcrepe_accuracy_ties_fail():
    assert sugarcrepe_accuracy(np.array([0.5, 0.4, 0.3]), np.array([0.4, 0.4, 0.5])) == pytest.approx(1 / 3)
    assert pair_similarity(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]])).tolist() == [11.0]


def test_linear_probe_separable():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    x = rng.normal(size=(60, 5)) * 0.1 + np.eye(5)[y] * 3
    out, c = linear_probe(x, y, x[::3], y[::3], n_classes=4, c_grid=(0.1, 1.0))
    assert out.metrics["acc1"] == 1.0 and c in (0.1, 1.0)
    assert out.counts["n_classes"] == 4


# ---- the same values as CLIP_benchmark's own functions on the same inputs (issue 21 item 4) ----


def _no_ties(n_q: int, n_k: int, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(n_q, d)), rng.normal(size=(n_k, d))
    return q / np.linalg.norm(q, axis=1, keepdims=True), k / np.linalg.norm(k, axis=1, keepdims=True)


def test_retrieval_recall_equals_clip_benchmark():
    torch = pytest.importorskip("torch")
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    images, texts = _no_ties(30, 75, seed=1)
    owner = np.repeat(np.arange(30), [3, 2] * 15)  # every image has 2 or 3 captions (CLIP_benchmark's queries)
    texts = texts + 0.35 * images[owner]  # correlated: recalls between chance and 1
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    pairs = np.stack([owner, np.arange(75)], 1)
    ours = retrieval_metrics(images, texts, pairs, ks=(1, 5, 10), backend="torch").metrics
    scores = torch.from_numpy(texts @ images.T).float()  # texts x images, as CLIP_benchmark holds them
    positive = torch.zeros(75, 30, dtype=torch.bool)
    positive[torch.arange(75), torch.from_numpy(owner)] = True
    for k in (1, 5, 10):
        t2i = (zr.recall_at_k(scores, positive, k) > 0).float().mean().item()
        i2t = (zr.recall_at_k(scores.T, positive.T, k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=1e-7)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=1e-7)
    assert 0.1 < ours["image_retrieval_recall@1"] < 0.9 and 0.1 < ours["text_retrieval_recall@1"] < 0.9


def test_classification_and_prototypes_equal_clip_benchmark():
    torch = pytest.importorskip("torch")
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(3)
    n_classes, n_templates, d = 7, 3, 12
    prompt_emb = rng.normal(size=(n_classes, n_templates, d))
    classnames = [f"c{i}" for i in range(n_classes)]
    templates = ["a {c}.", "the {c}!", "{c}?"]
    table = {t.format(c=c): prompt_emb[i, j] for i, c in enumerate(classnames) for j, t in enumerate(templates)}
    names = list(table)

    class Model:  # encode_text of precomputed prompt vectors, the interface CLIP_benchmark calls
        def encode_text(self, ids):
            return torch.from_numpy(np.stack([table[names[i]] for i in ids.tolist()]))

    weights = zc.zero_shot_classifier(Model(), lambda texts: torch.tensor([names.index(t) for t in texts]),
                                      classnames, templates, "cpu", amp=False)  # [D, C]
    protos = class_prototypes(prompt_emb)
    np.testing.assert_allclose(protos, weights.T.numpy(), rtol=0, atol=1e-6)
    images = rng.normal(size=(200, d))
    labels = rng.integers(0, n_classes, 200)
    images[np.arange(200)] += 1.5 * protos[labels]  # better than chance, below 1
    scores = images @ protos.T.astype(np.float64)
    ours = classification_metrics(scores, labels).metrics
    # zc.accuracy's own last line fails under numpy >= 2 (float() of a 1-element array); its ranking, as written:
    pred_k = torch.from_numpy(scores).topk(5, 1, True, True)[1].t()
    correct = pred_k.eq(torch.from_numpy(labels).view(1, -1).expand_as(pred_k))
    acc1, acc5 = (correct[:k].reshape(-1).float().sum().item() / len(labels) for k in (1, 5))
    pred = scores.argmax(axis=1)
    assert (ours["acc1"], ours["acc5"]) == (pytest.approx(acc1, abs=1e-12), pytest.approx(acc5, abs=1e-12))
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-12)
    assert 0.2 < ours["acc1"] < 1


def test_an_unknown_ranking_backend_is_refused_as_bad_input():
    q = np.eye(2)
    with pytest.raises(RankingBackendError, match=r"^unknown ranking backend 'fast' \(known: auto, torch, faiss\)$"):
        topk(q, q, 1, "fast")
    assert issubclass(RankingBackendError, ValueError)
