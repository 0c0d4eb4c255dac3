"""From examples (text + observed lengths) to a fitted model: embed, compress, select, fit.

Shared by the offline commands (`train`, `evaluate`) and the service's background retrain, so the
model the service swaps in is built exactly like the one evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from services.predictor.features import (
    Embedder,
    EmbeddingCache,
    F32Array,
    Projection,
    text_key,
)
from services.predictor.model import (
    FittedModel,
    LabeledSet,
    ModelConfig,
    Objective,
    fit_model,
    holdout_mask,
)
from services.predictor.rows import Example


@dataclass
class Caches:
    """Raw embeddings by text: instructions (few, reused by every request) and inputs."""

    app: EmbeddingCache
    input: EmbeddingCache

    @classmethod
    def new(cls, input_capacity: int = 30_000) -> Caches:
        return cls(EmbeddingCache(4096), EmbeddingCache(input_capacity))


def embed_examples(examples: Sequence[Example], embedder: Embedder, caches: Caches,
                   chunk: int = 256) -> tuple[F32Array, F32Array]:
    app = caches.app.embed(embedder, [e.instruction for e in examples], chunk)
    user = caches.input.embed(embedder, [e.input for e in examples], chunk)
    return app, user


def fit_projections(examples: Sequence[Example], app_raw: F32Array, user_raw: F32Array,
                    config: ModelConfig) -> tuple[Projection, Projection]:
    """PCA of the instructions over distinct apps (a core app with thousands of rows would
    otherwise own every component), and of the inputs over all rows."""
    first: dict[bytes, int] = {}
    for i, e in enumerate(examples):
        first.setdefault(text_key(e.instruction), i)
    app_proj = Projection.fit(app_raw[sorted(first.values())], config.app_dims)
    user_proj = Projection.fit(user_raw, config.user_dims)
    return app_proj, user_proj


def labeled(examples: Sequence[Example], app_raw: F32Array, user_raw: F32Array,
            app_proj: Projection, user_proj: Projection) -> LabeledSet:
    return LabeledSet.build(examples, app_proj.transform(app_raw), user_proj.transform(user_raw))


@dataclass(frozen=True)
class Candidate:
    objective: Objective
    user_history: bool
    val_mae: float
    version: str


def select_and_fit(train: LabeledSet, val: LabeledSet, app_proj: Projection,
                   user_proj: Projection, embedder: Embedder, config: ModelConfig
                   ) -> tuple[FittedModel, list[Candidate]]:
    """Pick the point objective, then whether user history helps, by MAE on `val`.

    Two steps instead of the full grid: the objective choice does not depend on one extra block
    of history columns, and each fit costs seconds on two cores."""
    tried: list[Candidate] = []

    def fit(c: ModelConfig) -> FittedModel:
        m = fit_model(train, val, app_proj, user_proj, embedder.config, c)
        point, _ = m.predict_set(val)
        mae = float(np.mean(np.abs(np.clip(np.round(point), 1, None) - val.generated)))
        tried.append(Candidate(c.objective, c.user_history, mae, m.version))
        return m

    by_objective = [fit(replace(config, objective=o, user_history=False))
                    for o in ("log-squared", "absolute")]
    best = min(zip(tried, by_objective, strict=True), key=lambda t: t[0].val_mae)[1]
    with_users = fit(replace(best.config, user_history=True))
    if tried[-1].val_mae < min(c.val_mae for c in tried[:-1]):
        best = with_users
    return best, tried


def retrain(base: FittedModel | None, store: Sequence[Example], embedder: Embedder,
            caches: Caches, config: ModelConfig, holdout_share: float, min_samples: int,
            version_prefix: str) -> FittedModel | None:
    """A new model from the base training rows plus the online store (None: too little data).

    With a base artifact its projections and base rows are reused (the store rows are embedded and
    compressed the same way); without one, everything is fitted on the store alone. A hashed share
    of the store is held out for early stopping and calibration, with the base hold-out rows."""
    if base is None and len(store) < min_samples:
        return None
    # Small chunks: the service's predictions wait for the embedder between two of them.
    app_raw, user_raw = embed_examples(store, embedder, caches, chunk=32)
    if base is not None:
        app_proj, user_proj = base.app_projection, base.user_projection
        config = replace(base.config, threads=config.threads)
    else:
        app_proj, user_proj = fit_projections(store, app_raw, user_raw, config)
        config = replace(config, app_dims=app_proj.dims, user_dims=user_proj.dims)
    new = labeled(store, app_raw, user_raw, app_proj, user_proj) if store else \
        LabeledSet.empty(app_proj.dims, user_proj.dims)
    hold = holdout_mask(new.request_ids, holdout_share)
    train, holdout = new.take(~hold), new.take(hold)
    base_train = base_hold = LabeledSet.empty(app_proj.dims, user_proj.dims)
    if base is not None:
        base_train, base_hold = base.base_train, base.base_holdout
        train, holdout = base_train.concat(train), base_hold.concat(holdout)
    if len(train) == 0:
        return None
    # The artifact keeps only the base rows: the store lives in Redis and is added afresh each time.
    return fit_model(train, holdout, app_proj, user_proj, embedder.config, config,
                     version_prefix=version_prefix, base_train=base_train,
                     base_holdout=base_hold)
