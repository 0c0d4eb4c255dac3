"""Predictor features: shapes, determinism, shrinkage, out-of-fold history, the embedding cache."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.predictor.features import (
    EMBEDDING_DIM,
    STAT_NAMES,
    EmbedderConfig,
    EmbeddingCache,
    F32Array,
    Projection,
    assemble,
    estimate_prior_strength,
    feature_names,
    fit_history,
    fold_of,
    out_of_fold_history,
)


class CountingEmbedder:
    """Deterministic pseudo-embeddings from a hash of the text; counts the texts it embeds."""

    def __init__(self) -> None:
        self.config = EmbedderConfig()
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str]) -> F32Array:
        self.calls.append(len(texts))
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big")
            out[i] = np.random.default_rng(seed).standard_normal(EMBEDDING_DIM)
        return out


def test_projection_shapes_and_determinism() -> None:
    x = np.random.default_rng(0).standard_normal((50, EMBEDDING_DIM)).astype(np.float32)
    a, b = Projection.fit(x, 16), Projection.fit(x, 16)
    assert a.dims == 16 and a.transform(x).shape == (50, 16)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_array_equal(a.transform(x[:3]), b.transform(x[:3]))
    # Fewer rows than dims asked: as many components as the data supports.
    assert Projection.fit(x[:5], 16).dims == 4
    assert Projection.fit(x[:1], 16).transform(x[:2]).shape == (2, 0)


def test_projection_keeps_the_main_direction() -> None:
    rng = np.random.default_rng(1)
    direction = rng.standard_normal(EMBEDDING_DIM)
    x = (np.outer(rng.standard_normal(200) * 10, direction)
         + rng.standard_normal((200, EMBEDDING_DIM)) * 0.1).astype(np.float32)
    p = Projection.fit(x, 2)
    cos = abs(p.components[0] @ direction) / np.linalg.norm(direction)
    assert cos > 0.99


def test_shrinkage_toward_global_by_count() -> None:
    # App "big" has 100 rows at 400, app "one" a single row at 10, app "rest" 100 rows at 100.
    keys = ["big"] * 100 + ["one"] + ["rest"] * 100
    y = np.array([400.0] * 100 + [10.0] + [100.0] * 100)
    capped = np.zeros(len(y), bool)
    t = fit_history(keys, y, capped, prior_strength=5.0)
    g = t.global_row[0]
    assert t.lookup(["one"])[0, 0] == pytest.approx((1 * 10 + 5 * g) / 6)
    assert t.lookup(["big"])[0, 0] == pytest.approx((100 * 400 + 5 * g) / 105)
    # An unknown app gets the global figures, with n = 0.
    unknown = t.lookup(["never-seen"])[0]
    np.testing.assert_allclose(unknown, t.global_row)
    assert unknown[STAT_NAMES.index("log_n")] == 0
    assert t.count("big") == 100 and t.count("never-seen") == 0


def test_prior_strength_follows_the_data() -> None:
    rng = np.random.default_rng(2)
    # Groups far apart and internally tight: trust each group's few samples (small k).
    tight_keys = [f"g{i}" for i in range(20) for _ in range(10)]
    tight_y = np.concatenate([np.full(10, 10.0 * (i + 1)) * rng.uniform(0.95, 1.05, 10)
                              for i in range(20)])
    # Every group drawn from one distribution: group means are noise (k at its ceiling).
    same_y = rng.lognormal(4, 1, 200)
    assert estimate_prior_strength(tight_keys, tight_y) < 2
    assert estimate_prior_strength(tight_keys, same_y) > 50


def test_out_of_fold_history_never_sees_the_row_itself() -> None:
    keys = ["a"] * 10 + ["solo"]
    y = np.array([100.0] * 10 + [5000.0])
    ids = [f"r{i}" for i in range(11)]
    folds = np.array([fold_of(r, 5) for r in ids], dtype=np.int64)
    oof = out_of_fold_history(keys, y, np.zeros(11, bool), folds, 5, prior_strength=1.0)
    # The lone row of "solo" sees no row of its own app: global figures of the others, n = 0.
    assert oof[10, STAT_NAMES.index("log_n")] == 0
    assert oof[10, 0] == pytest.approx(100.0)


def test_fold_of_is_stable_and_in_range() -> None:
    assert fold_of("x:1", 5) == fold_of("x:1", 5)
    assert {fold_of(f"r{i}", 5) for i in range(200)} == set(range(5))


def test_assemble_shape_matches_names() -> None:
    n = 7
    x = assemble(np.arange(n, dtype=np.int64), np.zeros((n, len(STAT_NAMES))),
                 np.ones((n, len(STAT_NAMES))), np.zeros((n, 3), np.float32),
                 np.zeros((n, 5), np.float32))
    assert x.shape == (n, len(feature_names(3, 5, user_history=True, neighbours=False)))
    assert x.dtype == np.float32
    assert x[3, 1] == pytest.approx(np.log1p(3))
    no_users = assemble(np.arange(n, dtype=np.int64), np.zeros((n, len(STAT_NAMES))), None,
                        np.zeros((n, 3), np.float32), np.zeros((n, 5), np.float32))
    assert no_users.shape[1] == len(feature_names(3, 5, user_history=False, neighbours=False))


def test_embedding_cache_embeds_distinct_texts_once_and_is_bounded() -> None:
    emb = CountingEmbedder()
    cache = EmbeddingCache(capacity=3)
    v1 = cache.embed(emb, ["a", "b", "a"])
    assert emb.calls == [2] and v1.shape == (3, EMBEDDING_DIM)
    np.testing.assert_array_equal(v1[0], v1[2])
    v2 = cache.embed(emb, ["b", "a"])
    assert emb.calls == [2]  # all cached
    np.testing.assert_array_equal(v2[1], v1[0])
    cache.embed(emb, ["c", "d"])
    assert len(cache) == 3
    assert cache.embed(emb, []).shape == (0, EMBEDDING_DIM)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 512)), min_size=1,
                max_size=40), st.floats(1, 50))
def test_shrunk_stats_lie_between_group_and_global(rows: list[tuple[str, int]],
                                                   k: float) -> None:
    keys = [a for a, _ in rows]
    y = np.array([v for _, v in rows], dtype=np.float64)
    t = fit_history(keys, y, y >= 512, prior_strength=k)
    for key in set(keys):
        own = y[[i for i, a in enumerate(keys) if a == key]].mean()
        lo, hi = sorted((own, t.global_row[0]))
        assert lo - 1e-9 <= t.lookup([key])[0, 0] <= hi + 1e-9


def test_app_neighbours_use_similar_apps_never_the_app_itself() -> None:
    from services.predictor.features import NEIGHBOUR_NAMES, AppNeighbours

    keys = ["imdb-a"] * 5 + ["imdb-b"] * 5 + ["code"] * 5
    y = np.array([20.0] * 5 + [30.0] * 5 + [400.0] * 5)
    table = fit_history(keys, y, np.zeros(15, bool), prior_strength=1.0)
    emb = np.array([[1.0, 0.1]] * 5 + [[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5, dtype=np.float32)
    nb = AppNeighbours.build(keys, emb, table)
    assert list(nb.app_ids) == ["code", "imdb-a", "imdb-b"]
    feats = nb.features(["imdb-a", "new-imdb", "code"],
                        np.array([[1.0, 0.1], [1.0, 0.05], [0.0, 1.0]], np.float32), k=1)
    assert feats.shape == (3, len(NEIGHBOUR_NAMES))
    mean = NEIGHBOUR_NAMES.index("nb_mean")
    # imdb-a's nearest other app is imdb-b; a new imdb-like app also lands on an imdb app.
    assert feats[0, mean] == pytest.approx(table.lookup(["imdb-b"])[0, 0])
    assert feats[1, mean] < 100
    assert feats[2, mean] < 100  # code's only neighbours are the imdb apps, never itself
    assert feats[1, -1] == pytest.approx(1.0, abs=0.01)
    empty = AppNeighbours.build([], np.zeros((0, 2), np.float32), table)
    assert empty.features(["x"], np.ones((1, 2), np.float32)).shape == (1, len(NEIGHBOUR_NAMES))


def test_embedder_window_keeps_the_tail_of_a_long_input() -> None:
    text = "HEAD " + "filler " * 200 + "The sentiment expressed for the movie is"
    head = EmbedderConfig(window="head").clip(text)
    both = EmbedderConfig(window="head_tail").clip(text)
    assert head.startswith("HEAD") and "sentiment" not in head
    assert both.startswith("HEAD") and both.endswith("for the movie is")
    assert len(both) < 4 * EmbedderConfig().max_seq_length * 2
    short = "Correct me please."
    assert EmbedderConfig(window="head_tail").clip(short) == short
