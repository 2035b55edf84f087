"""Synthetic raw logs (contract v1) with a hidden, known click -> conversion funnel.

``generate_logs`` writes impressions, clicks, conversions and the user/item snapshots
under ``warehouse/raw/`` and, beside them under ``warehouse/truth/`` (never under raw/),
the true per-impression probabilities the labels were drawn with.

The hidden world:

* users and items with Zipf-Mandelbrot activity / popularity, attributes (age bucket,
  gender, city, 1-5 interest categories; category, brand, shop, log-normal price per
  category) and latent factors that drift a little every day (a stationary AR(1) walk);
* each task's logit is a sum of effects a model can learn from the logged features
  (latent user x item match, interest match, position bias by slot, device, price
  sensitivity per age bucket, brand and category effects, user propensity) plus the
  MMoE paper's construction on a shared feature vector x, where the task weights
  w1 = c*u1 and w2 = c*(p*u1 + sqrt(1-p^2)*u2) make ``task_correlation`` p tune how
  related the two tasks are, plus per-impression noise no model can see;
* intercepts are bisected once per run (on a seeded sample) to hit the target CTR and
  conversion-after-click rate;
* a conversion's value is the item's price times a quantity (geometric, its mean set by the
  user's age bucket: ``BASKET_SIZE``) times a little noise, so E[value | conversion]
  depends on an item feature (price) and a user feature (age bucket).

Event times: clicks come seconds to minutes after the impression (always inside the
click window), conversions hours after the click (inside the attribution window);
each event is partitioned by its own UTC day. The log is cut at the end of the last
generated day, as a real log read that night would be: events that would land later
are not written (counted in the summary), so the last days' labels are immature.

Determinism: every random stream is a ``SeedSequence(seed, spawn_key=...)`` child named
by what it draws and, for daily streams, by the day's index from ``start_date`` (and the
chunk's index within the day), so day d's impressions do not depend on how many days
are generated, and the same config gives byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.catalog import DATA_FILE, raw_dir, truth_dir
from features.config import ConfigError, DataConfig, GenerateConfig
from features.contract import TS
from features.io import atomic_dir, write_parquet_dir

US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND
# Large days are generated and written in chunks of this many impressions (bounded memory).
# Part of the determinism contract: changing it changes the output for days above it.
CHUNK_ROWS = 1_000_000
CALIBRATION_SAMPLE = 200_000

# Stream names (first element of every spawn_key).
WORLD_STREAM, CALIBRATION_STREAM, DAY_STREAM, CHUNK_STREAM, DRIFT_STREAM = range(5)

# Shapes of the hidden world that are not run knobs.
ZIPF_OFFSET = 10.0  # Zipf-Mandelbrot offset: a heavy head without one user taking 10% of traffic
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_SHARES = (0.18, 0.32, 0.24, 0.15, 0.11)
GENDERS = ("f", "m", "u")
GENDER_SHARES = (0.48, 0.44, 0.08)
DEVICES = ("ios", "android", "web")
DEVICE_SHARES = (0.45, 0.40, 0.15)
PREFERRED_DEVICE_SHARE = 0.85  # an impression comes from the user's usual device this often
TARGETED_SHARE = 0.30  # impressions whose item is drawn from one of the user's interest categories
SLOT_DECAY = 0.85  # share of impressions at slot s is proportional to SLOT_DECAY**s
# Traffic by UTC hour: quiet at night, peak in the evening.
HOURLY_TRAFFIC = (
    0.35, 0.25, 0.18, 0.15, 0.15, 0.20, 0.35, 0.55, 0.75, 0.85, 0.90, 0.95,
    1.00, 0.95, 0.90, 0.90, 0.95, 1.05, 1.20, 1.35, 1.45, 1.40, 1.10, 0.70,
)  # fmt: skip
CLICK_DELAY_SCALE_S = 40.0  # clicks: truncated exponential delay after the impression
CONVERSION_DELAY_SCALE_H = 4.0  # conversions: truncated exponential delay after the click

# Effect sizes on the logit scale: (click, conversion-given-click).
LATENT_MATCH = (0.7, 0.5)
INTEREST_MATCH = (0.8, 0.4)
POSITION_BIAS = (0.6, 0.1)  # times log1p(slot)
DEVICE_EFFECT = ((0.15, 0.0, -0.30), (0.10, -0.10, 0.25))  # per DEVICES
PRICE_SENSITIVITY = ((-0.30, -0.25, -0.20, -0.15, -0.10), (-0.60, -0.45, -0.30, -0.25, -0.15))  # per AGE_BUCKETS
BRAND_EFFECT_STD = (0.3, 0.4)
CATEGORY_EFFECT_STD = (0.3, 0.3)
USER_PROPENSITY_STD = (0.3, 0.4)
BASKET_SIZE = (1.1, 1.3, 1.8, 2.4, 1.5)  # mean quantity bought per conversion, per AGE_BUCKETS
MMOE_SCALE = 1.0  # c in w1 = c*u1, w2 = c*(p*u1 + sqrt(1-p^2)*u2)
MMOE_SINES = 5  # number of sin(a_i w^T x + b_i) terms


@dataclass
class GenerateSummary:
    """What ``generate_logs`` wrote, and the realised funnel rates."""

    warehouse: Path
    start_date: dt.date
    days: int
    seed: int
    task_correlation: float
    rows: dict[str, int]  # rows written per raw table
    events_after_end: int  # clicks + conversions that would land after the last day (not written)
    ctr: float  # realised clicks / impressions
    cvr_after_click: float  # realised conversions / clicks
    late_conversion_share: float  # conversions partitioned on a later day than their click
    seconds: float

    @property
    def impressions_per_second(self) -> float:
        return self.rows["impressions"] / self.seconds if self.seconds > 0 else float("inf")

    def describe(self) -> str:
        end = self.start_date + dt.timedelta(days=self.days)
        r = self.rows
        return "\n".join(
            [
                f"synthetic logs: {self.days} day(s) from {self.start_date} (seed {self.seed}, "
                f"task correlation {self.task_correlation:.2f}) -> {self.warehouse}",
                f"  impressions {r['impressions']:>12,}   users {r['users']:,}   items {r['items']:,}",
                f"  clicks      {r['clicks']:>12,}   CTR {self.ctr:.2%}",
                f"  conversions {r['conversions']:>12,}   CVR after click {self.cvr_after_click:.2%}, "
                f"{self.late_conversion_share:.1%} on a later day than their click",
                f"  not written: {self.events_after_end:,} clicks/conversions after the log's end ({end} 00:00 UTC)",
                f"  {self.seconds:.1f} s, {self.impressions_per_second:,.0f} impressions/s",
            ]
        )


@dataclass
class World:
    """The hidden state: attributes (logged) and factors/effects (never logged)."""

    # users
    user_age: np.ndarray  # int, index into AGE_BUCKETS
    user_gender: np.ndarray
    user_city: np.ndarray
    user_device: np.ndarray  # preferred device, index into DEVICES
    interest_offsets: np.ndarray  # int32, CSR rows of interest category indices
    interest_values: np.ndarray
    interest_matrix: np.ndarray  # bool users x categories
    user_cdf: np.ndarray  # activity (Zipf)
    user_propensity: np.ndarray  # (users, 2)
    # items
    item_category: np.ndarray
    item_brand: np.ndarray
    item_shop: np.ndarray
    item_price: np.ndarray
    item_log_price_z: np.ndarray  # standardised log price
    item_effect: np.ndarray  # (items, 2): brand + category effects
    items_by_category: np.ndarray  # item indices sorted by category
    category_cdf_bounds: np.ndarray  # (categories, 2): each category's slice of item_cdf_sorted
    item_cdf_sorted: np.ndarray  # popularity cdf over items_by_category
    item_cdf: np.ndarray  # popularity cdf over item indices
    # latent factors (drift daily) and the MMoE construction
    user_factors: np.ndarray  # (users, latent_dim)
    item_factors: np.ndarray  # (items, latent_dim)
    mmoe_weights: np.ndarray  # (feature_dim, 2): columns w1, w2
    sine_a: np.ndarray
    sine_b: np.ndarray
    slot_cdf: np.ndarray
    slot_mean: float
    slot_std: float
    noise_std: float  # per-impression logit noise (unobservable)
    latent_match_scale: float  # multiplies the user x item factor products
    intercepts: np.ndarray  # (2,): click, conversion-given-click


def _stream(seed: int, *key: int) -> np.random.Generator:
    """The generator of one named stream: a SeedSequence child keyed by ``key``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _zipf_cdf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """CDF over n entities whose weights follow Zipf-Mandelbrot ranks, ranks shuffled."""
    weights = 1.0 / (rng.permutation(n) + 1.0 + ZIPF_OFFSET) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _draw(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n indices drawn from the distribution with this CDF."""
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def _shares_cdf(shares: tuple[float, ...] | np.ndarray) -> np.ndarray:
    cdf = np.cumsum(np.asarray(shares, dtype=np.float64))
    return cdf / cdf[-1]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def _mmoe_blocks(latent_dim: int) -> list[int]:
    """Block sizes of the MMoE feature vector x, each entry of roughly unit scale: user
    factors, item factors, their product, device one-hot, age one-hot, then slot, log
    price and interest match (standardised)."""
    return [latent_dim, latent_dim, latent_dim, len(DEVICES), len(AGE_BUCKETS), 1, 1, 1]


def _build_world(g: GenerateConfig, seed: int) -> World:
    rng = _stream(seed, WORLD_STREAM)
    n_users, n_items, n_cats, dim = g.users, g.items, g.categories, g.latent_dim

    category_factors = rng.standard_normal((n_cats, dim))
    category_popularity = _zipf_cdf(n_cats, 1.0, rng)
    category_weights = np.diff(category_popularity, prepend=0.0)
    user_factors = rng.standard_normal((n_users, dim))

    # Interests: the user's top 1-5 categories by affinity + popularity + Gumbel noise.
    affinity = user_factors @ category_factors.T / np.sqrt(dim)
    scores = affinity + np.log(category_weights) + rng.gumbel(size=(n_users, n_cats))
    top = min(5, n_cats)
    ranked = np.argsort(-scores, axis=1)[:, :top]
    counts = np.minimum(rng.integers(1, 6, n_users), top)
    keep = np.arange(top)[None, :] < counts[:, None]
    interest_values = ranked[keep].astype(np.int32)  # row-major: each user's interests in order
    interest_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    interest_matrix = np.zeros((n_users, n_cats), dtype=bool)
    interest_matrix[np.repeat(np.arange(n_users), counts), interest_values] = True

    item_category = _draw(category_popularity, rng, n_items)
    # Items lean towards their category's direction, so interests and latent match agree.
    item_factors = 0.6 * category_factors[item_category] + 0.8 * rng.standard_normal((n_items, dim))
    item_brand = _draw(_zipf_cdf(g.brands, 1.0, rng), rng, n_items)
    item_shop = _draw(_zipf_cdf(g.shops, 0.8, rng), rng, n_items)
    category_log_price = rng.normal(np.log(30.0), 0.9, n_cats)
    log_price = category_log_price[item_category] + rng.normal(0.0, 0.4, n_items)
    item_price = np.round(np.exp(log_price), 2).clip(0.01)
    log_price_z = (np.log(item_price) - np.log(item_price).mean()) / max(np.log(item_price).std(), 1e-9)
    brand_effect = rng.standard_normal((g.brands, 2)) * BRAND_EFFECT_STD
    category_effect = rng.standard_normal((n_cats, 2)) * CATEGORY_EFFECT_STD
    item_effect = brand_effect[item_brand] + category_effect[item_category]

    item_cdf = _zipf_cdf(n_items, g.item_popularity_exponent, rng)
    item_weights = np.diff(item_cdf, prepend=0.0)
    items_by_category = np.argsort(item_category, kind="stable")
    item_cdf_sorted = np.cumsum(item_weights[items_by_category])
    item_cdf_sorted /= item_cdf_sorted[-1]
    ends = np.searchsorted(item_category[items_by_category], np.arange(n_cats), side="right")
    starts = np.concatenate([[0], ends[:-1]])
    cum = np.concatenate([[0.0], item_cdf_sorted])
    category_cdf_bounds = np.stack([cum[starts], cum[ends]], axis=1)  # empty category: equal bounds

    # MMoE construction: orthonormal u1, u2 over the shared feature vector x.
    q, _ = np.linalg.qr(rng.standard_normal((sum(_mmoe_blocks(dim)), 2)))
    u1, u2 = q[:, 0], q[:, 1]
    p = g.task_correlation
    mmoe_weights = MMOE_SCALE * np.stack([u1, p * u1 + np.sqrt(1.0 - p * p) * u2], axis=1)
    slot_shares = SLOT_DECAY ** np.arange(g.slots)
    slot_shares /= slot_shares.sum()
    slot_mean = float(slot_shares @ np.arange(g.slots))
    slot_std = float(np.sqrt(slot_shares @ (np.arange(g.slots) - slot_mean) ** 2)) or 1.0

    return World(
        user_age=_draw(_shares_cdf(AGE_SHARES), rng, n_users),
        user_gender=_draw(_shares_cdf(GENDER_SHARES), rng, n_users),
        user_city=_draw(_zipf_cdf(g.cities, 1.0, rng), rng, n_users),
        user_device=_draw(_shares_cdf(DEVICE_SHARES), rng, n_users),
        interest_offsets=interest_offsets,
        interest_values=interest_values,
        interest_matrix=interest_matrix,
        user_cdf=_zipf_cdf(n_users, g.user_activity_exponent, rng),
        user_propensity=rng.standard_normal((n_users, 2)) * USER_PROPENSITY_STD,
        item_category=item_category,
        item_brand=item_brand,
        item_shop=item_shop,
        item_price=item_price,
        item_log_price_z=log_price_z,
        item_effect=item_effect,
        items_by_category=items_by_category,
        category_cdf_bounds=category_cdf_bounds,
        item_cdf_sorted=item_cdf_sorted,
        item_cdf=item_cdf,
        user_factors=user_factors,
        item_factors=item_factors,
        mmoe_weights=mmoe_weights,
        sine_a=rng.standard_normal(MMOE_SINES),
        sine_b=rng.standard_normal(MMOE_SINES),
        slot_cdf=_shares_cdf(slot_shares),
        slot_mean=slot_mean,
        slot_std=slot_std,
        noise_std=g.noise,
        latent_match_scale=g.latent_match_scale,
        intercepts=np.zeros(2),
    )


def _drift(world: World, step: float, rng: np.random.Generator) -> None:
    """One day of drift: a stationary AR(1) step keeps the factors' scale constant."""
    keep = np.sqrt(1.0 - step * step)
    world.user_factors = keep * world.user_factors + step * rng.standard_normal(world.user_factors.shape)
    world.item_factors = keep * world.item_factors + step * rng.standard_normal(world.item_factors.shape)


def _draw_impressions(world: World, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """(user, item, device, slot) indices of n impressions."""
    user = _draw(world.user_cdf, rng, n)
    item = _draw(world.item_cdf, rng, n)
    # Targeted impressions: an item from one of the user's interest categories, by popularity.
    targeted = np.flatnonzero(rng.random(n) < TARGETED_SHARE)
    tu = user[targeted]
    starts, ends = world.interest_offsets[tu], world.interest_offsets[tu + 1]
    category = world.interest_values[starts + (rng.random(len(tu)) * (ends - starts)).astype(np.int64)]
    lo, hi = world.category_cdf_bounds[category].T
    has_items = hi > lo
    u = lo + rng.random(len(tu)) * (hi - lo)
    pos = np.minimum(np.searchsorted(world.item_cdf_sorted, u, side="right"), len(world.items_by_category) - 1)
    item[targeted[has_items]] = world.items_by_category[pos[has_items]]

    usual = rng.random(n) < PREFERRED_DEVICE_SHARE
    device = np.where(usual, world.user_device[user], _draw(_shares_cdf(DEVICE_SHARES), rng, n))
    slot = _draw(world.slot_cdf, rng, n)
    return user, item, device, slot


def _logits_without_intercept(
    world: World, rng: np.random.Generator, user: np.ndarray, item: np.ndarray, device: np.ndarray, slot: np.ndarray
) -> np.ndarray:
    """(n, 2) hidden logits (click, conversion-given-click) before the intercepts."""
    dim = world.user_factors.shape[1]
    # Products of the factors: the latent match is their mean, and a block of the MMoE x
    # (times 1.0 by default, which is exact: the default world is unchanged).
    match = world.user_factors[user] * world.item_factors[item] * world.latent_match_scale
    latent_match = match.sum(axis=1) / np.sqrt(dim)
    interest = world.interest_matrix[user, world.item_category[item]]
    age = world.user_age[user]
    price_z = world.item_log_price_z[item]

    # w^T x for the MMoE term, block by block (x is never materialised); the user and
    # item blocks are computed once per entity, then gathered.
    blocks = np.split(world.mmoe_weights, np.cumsum(_mmoe_blocks(dim))[:-1])
    w_user, w_item, w_match, w_device, w_age, w_slot, w_price, w_interest = blocks
    wx_x = (
        (world.user_factors @ w_user)[user]
        + (world.item_factors @ w_item)[item]
        + match @ w_match
        + w_device[device]
        + w_age[age]
        + ((slot - world.slot_mean) / world.slot_std)[:, None] * w_slot
        + price_z[:, None] * w_price
        + ((interest - 0.5) * 2.0)[:, None] * w_interest
    )
    # The paper's y = w^T x + sum_i sin(a_i w^T x + b_i), a_i and b_i shared by both tasks.
    mmoe = wx_x.copy()
    for a_i, b_i in zip(world.sine_a, world.sine_b, strict=True):
        mmoe += np.sin(a_i * wx_x + b_i)

    logits = mmoe + latent_match[:, None] * LATENT_MATCH
    logits += interest[:, None] * np.asarray(INTEREST_MATCH)
    logits -= np.log1p(slot)[:, None] * np.asarray(POSITION_BIAS)
    logits += np.asarray(DEVICE_EFFECT).T[device]
    logits += np.asarray(PRICE_SENSITIVITY).T[age] * price_z[:, None]
    logits += world.item_effect[item] + world.user_propensity[user]
    return logits


def _noisy(logits: np.ndarray, world: World, rng: np.random.Generator) -> np.ndarray:
    """Add the per-impression noise that no model can see (it decides the labels)."""
    return logits + rng.standard_normal(logits.shape) * world.noise_std


def _bisect_intercept(rate_at: Callable[[float], float], target: float) -> float:
    """The intercept b with rate_at(b) == target (rate_at increases with b)."""
    lo, hi = -30.0, 30.0
    for _ in range(40):  # bracket width 60 / 2**40: far below sampling error
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rate_at(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def _calibrate(world: World, g: GenerateConfig, seed: int) -> np.ndarray:
    """Intercepts hitting the target CTR and conversion-after-click rate on a seeded sample."""
    rng = _stream(seed, CALIBRATION_STREAM)
    z = _noisy(_logits_without_intercept(world, rng, *_draw_impressions(world, rng, CALIBRATION_SAMPLE)), world, rng)
    b_click = _bisect_intercept(lambda b: _sigmoid(b + z[:, 0]).mean(), g.target_ctr)
    p_click = _sigmoid(b_click + z[:, 0])
    b_conversion = _bisect_intercept(lambda b: np.average(_sigmoid(b + z[:, 1]), weights=p_click), g.target_cvr)
    return np.array([b_click, b_conversion])


def _truncated_exponential_us(rng: np.random.Generator, n: int, scale_s: float, window_s: float) -> np.ndarray:
    """Delays in microseconds, in (1 s, window): exponential with ``scale_s``, cut at the window."""
    span = window_s - 1.0
    inside = -np.expm1(-span / scale_s)  # P(exponential < span): inverse CDF on [0, inside)
    delay_s = 1.0 - scale_s * np.log1p(-rng.random(n) * inside)
    return np.minimum((delay_s * US_PER_SECOND).astype(np.int64), int(window_s * US_PER_SECOND) - 1)


def _id_strings(prefix: str, count: int) -> pa.Array:
    """``prefix`` + zero-padded index for 0..count-1 (e.g. u00042)."""
    width = len(str(max(count - 1, 0)))
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(count)), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


def _impression_ids(day: dt.date, rows: np.ndarray) -> pa.Array:
    """Impression ids unique across days: ``<yyyymmdd>-<row in day, 9 digits>``."""
    digits = pc.utf8_lpad(pc.cast(pa.array(rows, type=pa.int64()), pa.string()), 9, "0")
    return pc.binary_join_element_wise(f"{day:%Y%m%d}-", digits, "")


IMPRESSIONS_SCHEMA = pa.schema([
    ("impression_id", pa.string()), ("ts", TS), ("user_id", pa.string()), ("item_id", pa.string()),
    ("device", pa.string()), ("slot", pa.int64()),
])  # fmt: skip
# p_*: the probabilities the labels were drawn with (they include the unobservable
# noise). *_logit_observable: the same logits without that noise, i.e. what a perfect
# model that sees every feature can rank by; use them for the oracle AUC.
TRUTH_SCHEMA = pa.schema(
    [
        ("impression_id", pa.string()),
        ("p_click", pa.float64()),
        ("p_conversion_given_click", pa.float64()),
        ("click_logit_observable", pa.float64()),
        ("conversion_logit_observable", pa.float64()),
    ]
)
CLICKS_SCHEMA = pa.schema([("impression_id", pa.string()), ("ts", TS)])
CONVERSIONS_SCHEMA = pa.schema([("impression_id", pa.string()), ("ts", TS), ("value", pa.float64())])


@dataclass
class _Names:
    """Arrow string arrays of every entity's id, indexed by entity index."""

    users: pa.Array
    items: pa.Array
    categories: pa.Array
    devices: pa.Array

    @classmethod
    def of(cls, g: GenerateConfig) -> _Names:
        return cls(
            users=_id_strings("u", g.users),
            items=_id_strings("i", g.items),
            categories=_id_strings("cat", g.categories),
            devices=pa.array(DEVICES, pa.string()),
        )


def _users_table(world: World, names: _Names, g: GenerateConfig) -> pa.Table:
    interests = pa.ListArray.from_arrays(
        pa.array(world.interest_offsets, pa.int32()), names.categories.take(pa.array(world.interest_values))
    )
    return pa.table({
        "user_id": names.users,
        "age_bucket": pa.array(AGE_BUCKETS, pa.string()).take(pa.array(world.user_age)),
        "gender": pa.array(GENDERS, pa.string()).take(pa.array(world.user_gender)),
        "city": _id_strings("city", g.cities).take(pa.array(world.user_city)),
        "interests": interests,
    })  # fmt: skip


def _items_table(world: World, names: _Names, g: GenerateConfig) -> pa.Table:
    return pa.table({
        "item_id": names.items,
        "category_id": names.categories.take(pa.array(world.item_category)),
        "brand_id": _id_strings("b", g.brands).take(pa.array(world.item_brand)),
        "shop_id": _id_strings("s", g.shops).take(pa.array(world.item_shop)),
        "price": pa.array(world.item_price, pa.float64()),
    })  # fmt: skip


@dataclass
class _Events:
    """Clicks or conversions of one day's impressions: impression row, event ts (and value)."""

    impression_day: int  # index from start_date
    row: np.ndarray
    ts: np.ndarray
    value: np.ndarray | None = None


class _EventBuffer:
    """Events by the day index of their own partition, until that partition is written."""

    def __init__(self, start_us: int, days: int) -> None:
        self.start_us, self.days = start_us, days  # partitions at or after `days` are not written
        self.pending: dict[int, list[_Events]] = defaultdict(list)
        self.after_end = 0

    def add(self, events: _Events) -> None:
        partition = (events.ts - self.start_us) // US_PER_DAY
        inside = partition < self.days
        self.after_end += int((~inside).sum())
        for p in np.unique(partition[inside]):
            take = partition == p
            value = None if events.value is None else events.value[take]
            self.pending[int(p)].append(_Events(events.impression_day, events.row[take], events.ts[take], value))

    def pop_table(self, day_index: int, start_date: dt.date, schema: pa.Schema) -> pa.Table:
        """The partition's rows in time order (an empty table when there are none)."""
        pieces = self.pending.pop(day_index, [])
        if not pieces:
            return schema.empty_table()
        ts = np.concatenate([e.ts for e in pieces])
        order = np.argsort(ts, kind="stable")
        ids = pa.concat_arrays(
            [_impression_ids(start_date + dt.timedelta(days=e.impression_day), e.row) for e in pieces]
        )
        columns = {"impression_id": ids.take(pa.array(order)), "ts": pa.array(ts[order], TS)}
        if "value" in schema.names:
            columns["value"] = pa.array(np.concatenate([e.value for e in pieces])[order], pa.float64())
        return pa.table(columns, schema=schema)


@dataclass
class _Counts:
    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    late_conversions: int = 0  # partitioned on a later day than their click

    def add(self, other: _Counts) -> None:
        self.impressions += other.impressions
        self.clicks += other.clicks
        self.conversions += other.conversions
        self.late_conversions += other.late_conversions


def _generate_chunk(
    world: World, names: _Names, cfg: DataConfig,
    rng: np.random.Generator, day: dt.date, day_index: int, first_row: int, ts: np.ndarray,
) -> tuple[pa.Table, pa.Table, _Events, _Events, _Counts]:  # fmt: skip
    """Impressions, truth, clicks and conversions of the rows [first_row, first_row + len(ts))."""
    n = len(ts)
    rows = np.arange(first_row, first_row + n, dtype=np.int64)
    user, item, device, slot = _draw_impressions(world, rng, n)
    observable = _logits_without_intercept(world, rng, user, item, device, slot) + world.intercepts
    p = _sigmoid(_noisy(observable, world, rng))

    clicked = np.flatnonzero(rng.random(n) < p[:, 0])
    click_ts = ts[clicked] + _truncated_exponential_us(
        rng, len(clicked), CLICK_DELAY_SCALE_S, cfg.contract.click_window_minutes * 60.0
    )
    converted = np.flatnonzero(rng.random(len(clicked)) < p[clicked, 1])
    conversion_ts = click_ts[converted] + _truncated_exponential_us(
        rng, len(converted), CONVERSION_DELAY_SCALE_H * 3600.0, cfg.contract.attribution_window_hours * 3600.0
    )
    bought = item[clicked[converted]]
    quantity = rng.geometric(1.0 / np.asarray(BASKET_SIZE)[world.user_age[user[clicked[converted]]]])
    value = np.round(world.item_price[bought] * quantity * np.exp(rng.normal(0.0, 0.05, len(converted))), 2)

    ids = _impression_ids(day, rows)
    impressions = pa.table({
        "impression_id": ids,
        "ts": pa.array(ts, TS),
        "user_id": names.users.take(pa.array(user)),
        "item_id": names.items.take(pa.array(item)),
        "device": names.devices.take(pa.array(device)),
        "slot": pa.array(slot, pa.int64()),
    }, schema=IMPRESSIONS_SCHEMA)  # fmt: skip
    truth = pa.table({
        "impression_id": ids,
        "p_click": p[:, 0],
        "p_conversion_given_click": p[:, 1],
        "click_logit_observable": observable[:, 0],
        "conversion_logit_observable": observable[:, 1],
    }, schema=TRUTH_SCHEMA)  # fmt: skip
    clicks = _Events(day_index, rows[clicked], click_ts)
    conversions = _Events(day_index, rows[clicked[converted]], conversion_ts, value)
    late = int((conversion_ts // US_PER_DAY > click_ts[converted] // US_PER_DAY).sum())
    return impressions, truth, clicks, conversions, _Counts(n, len(clicked), len(converted), late)


def _day_timestamps(rng: np.random.Generator, n: int, day_start_us: int) -> np.ndarray:
    """n sorted impression times over one UTC day, following HOURLY_TRAFFIC."""
    hour = _draw(_shares_cdf(HOURLY_TRAFFIC), rng, n)
    ts = day_start_us + hour * (3600 * US_PER_SECOND) + rng.integers(0, 3600 * US_PER_SECOND, n)
    ts.sort()
    return ts


def _generate_day(
    world: World, names: _Names, cfg: DataConfig, warehouse: Path, day_index: int, start_us: int,
    clicks_buffer: _EventBuffer, conversions_buffer: _EventBuffer,
) -> _Counts:  # fmt: skip
    """Write one day's impressions and truth chunk by chunk; buffer its clicks and conversions."""
    g = cfg.generate
    day = g.start_date + dt.timedelta(days=day_index)
    ts = _day_timestamps(_stream(cfg.seed, DAY_STREAM, day_index), g.impressions_per_day,
                         start_us + day_index * US_PER_DAY)  # fmt: skip
    total = _Counts()
    with (
        atomic_dir(raw_dir(warehouse, "impressions", day)) as imp_tmp,
        atomic_dir(truth_dir(warehouse, day)) as truth_tmp,
    ):
        # Dictionary pages only where values repeat: unique ids and random floats gain nothing.
        imp_writer = pq.ParquetWriter(imp_tmp / DATA_FILE, IMPRESSIONS_SCHEMA, compression="zstd",
                                      use_dictionary=["user_id", "item_id", "device", "slot"])  # fmt: skip
        truth_writer = pq.ParquetWriter(truth_tmp / DATA_FILE, TRUTH_SCHEMA, compression="zstd", use_dictionary=False)
        with imp_writer, truth_writer:
            for chunk, first in enumerate(range(0, len(ts), CHUNK_ROWS)):
                rng = _stream(cfg.seed, CHUNK_STREAM, day_index, chunk)
                impressions, truth, clicks, conversions, counts = _generate_chunk(
                    world, names, cfg, rng, day, day_index, first, ts[first : first + CHUNK_ROWS]
                )
                imp_writer.write_table(impressions)
                truth_writer.write_table(truth)
                clicks_buffer.add(clicks)
                conversions_buffer.add(conversions)
                total.add(counts)
    return total


def generate_logs(cfg: DataConfig, warehouse: Path, progress: bool = True) -> GenerateSummary:
    """Write ``cfg.generate.days`` days of synthetic raw logs (contract v1) under ``warehouse``.

    Also writes the users/items snapshots and, under ``truth/`` (not raw/), the true
    p_click and p_conversion_given_click of every impression. Every day in the range
    gets a partition in each daily table (possibly empty), replacing what was there.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    if cfg.seed < 0:
        raise ConfigError(f"seed: the generator needs a seed >= 0 (got {cfg.seed})")
    g = cfg.generate
    warehouse = Path(warehouse)
    started = time.perf_counter()
    world = _build_world(g, cfg.seed)
    world.intercepts = _calibrate(world, g, cfg.seed)
    names = _Names.of(g)
    write_parquet_dir(raw_dir(warehouse, "users"), _users_table(world, names, g))
    write_parquet_dir(raw_dir(warehouse, "items"), _items_table(world, names, g))

    start_us = int(dt.datetime.combine(g.start_date, dt.time(), dt.UTC).timestamp()) * US_PER_SECOND
    buffers = {"clicks": _EventBuffer(start_us, g.days), "conversions": _EventBuffer(start_us, g.days)}
    total = _Counts()
    rows = {"impressions": 0, "clicks": 0, "conversions": 0, "users": g.users, "items": g.items}
    columns = (TextColumn("generate {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(str(g.start_date), total=g.days)
        for day_index in range(g.days):
            day = g.start_date + dt.timedelta(days=day_index)
            bar.update(task, description=str(day))
            if day_index > 0:
                _drift(world, g.daily_drift, _stream(cfg.seed, DRIFT_STREAM, day_index))
            counts = _generate_day(world, names, cfg, warehouse, day_index, start_us, *buffers.values())
            total.add(counts)
            # Every event of this day's partition exists now: events come after their impression.
            for table, schema in (("clicks", CLICKS_SCHEMA), ("conversions", CONVERSIONS_SCHEMA)):
                events = buffers[table].pop_table(day_index, g.start_date, schema)
                write_parquet_dir(raw_dir(warehouse, table, day), events)
                rows[table] += events.num_rows
            rows["impressions"] += counts.impressions
            bar.advance(task)

    return GenerateSummary(
        warehouse=warehouse,
        start_date=g.start_date,
        days=g.days,
        seed=cfg.seed,
        task_correlation=g.task_correlation,
        rows=rows,
        events_after_end=sum(b.after_end for b in buffers.values()),
        ctr=total.clicks / max(total.impressions, 1),
        cvr_after_click=total.conversions / max(total.clicks, 1),
        late_conversion_share=total.late_conversions / max(total.conversions, 1),
        seconds=time.perf_counter() - started,
    )
