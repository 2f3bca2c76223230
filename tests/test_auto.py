"""`auto` and the device profile: decisions follow the cost curve, outputs stay plain's."""
import json
import subprocess
import sys

import numpy as np
import pytest

from edge_mtp.profile import GRID, Profile, load_profile, measure
from edge_mtp.strategies.lookup import Lookup

REPEATING = [{"role": "user", "content": "Repeat exactly, twice: the quick brown fox jumps over the "
                                         "lazy dog while the small cat sleeps on the warm red mat."}]


def curve(cost_of_n) -> Profile:
    return Profile("test", list(GRID), [float(cost_of_n(n)) for n in GRID], 10.0)


CHEAP = curve(lambda n: 1.0 + 0.01 * (n - 1))  # rows nearly free (a memory-bound model)
DEAR = curve(lambda n: float(n))               # every row costs a full step (nothing can pay)


def test_lookup_match_length_counts_the_shared_suffix():
    lk = Lookup()
    lk.start([5, 1, 2, 3, 4, 9, 9, 1, 2, 3])
    match, draft = lk.find(3)
    assert (match, draft) == (3, [4, 9, 9])
    lk.start([7, 1, 2, 3, 4, 9, 7, 1, 2, 3])
    assert lk.find(2) == (4, [4, 9])  # "7 1 2 3" occurred before: a 4-token match
    lk.start([1, 2, 3])
    assert lk.find(4) == (0, [])


def test_auto_drafts_when_rows_are_cheap_and_not_when_they_are_dear(engine):
    cheap = engine.chat(REPEATING, max_tokens=64, temperature=0, strategy="auto",
                        strategy_options={"profile": CHEAP})["speculation"]
    dear = engine.chat(REPEATING, max_tokens=64, temperature=0, strategy="auto",
                       strategy_options={"profile": DEAR})["speculation"]
    assert cheap["steps_by_kind"]["draft"] > 0 and cheap["mean_accepted_tokens_per_step"] > 1.3
    assert cheap["mean_draft_length"] > 2  # long matches on a repeat earn long drafts
    assert dear["steps_by_kind"]["draft"] == 0  # a draft never pays when each row costs a step
    assert "decision" in dear and "masks off" in dear["decision"]


def test_auto_without_room_to_calibrate_is_plain(model_path):
    from edge_mtp import Engine

    with Engine(str(model_path), n_ctx=128, n_threads=2) as e:
        r = e.generate("one two three one two three one two", max_tokens=16, temperature=0)
        assert r["speculation"]["strategy"] == "auto"
        assert r["speculation"]["drafted"] == 0  # no profile: plain steps only
        assert "no device profile" in r["speculation"]["decision"]
        assert r["tokens"] == e.generate("one two three one two three one two", max_tokens=16,
                                         temperature=0, strategy="plain")["tokens"]


def test_auto_sampling_stays_reproducible_and_valid(engine):
    a = engine.chat(REPEATING, max_tokens=32, temperature=0.7, seed=3, strategy="auto",
                    strategy_options={"profile": CHEAP})
    b = engine.chat(REPEATING, max_tokens=32, temperature=0.7, seed=3, strategy="auto",
                    strategy_options={"profile": CHEAP})
    assert a["tokens"] == b["tokens"] and 1 <= len(a["tokens"]) <= 32


def test_measure_gives_a_monotone_curve_and_caches_it(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_MTP_CACHE", str(tmp_path))
    prof = measure(engine.session, rounds=1)
    assert prof.rows == list(GRID) and prof.cost[0] == 1.0
    assert all(b >= a for a, b in zip(prof.cost, prof.cost[1:]))
    assert prof.step_ms > 0 and prof.cost[-1] > 1.0  # 64 rows cost more than one on any device
    again = load_profile(engine.session)
    assert again == prof
    ceiling, at = prof.ceiling
    assert ceiling == pytest.approx(max(n / c for n, c in zip(prof.rows, prof.cost)))
    assert prof.cost_of(7) == pytest.approx(np.interp(7, prof.rows, prof.cost))


def test_calibrate_cli_prints_the_curve(model_path, tmp_path):
    out = subprocess.run([sys.executable, "-m", "edge_mtp.cli", "calibrate", "-m", str(model_path),
                          "--rounds", "1", "-t", "2", "--json"], capture_output=True, text=True,
                         env={**__import__("os").environ, "EDGE_MTP_CACHE": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stderr
    prof = json.loads(out.stdout)
    assert prof["rows"] == list(GRID) and len(prof["cost"]) == len(GRID)
    assert list((tmp_path / "profiles").glob("*.json"))
