"""`auto` and the device profile: decisions follow the cost curve, outputs stay plain's."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_tool
from edge_mtp.profile import GRID, Profile, load_profile, measure, profile_key, robust_ratios, save_profile
from edge_mtp.strategies.auto import (EXPLORE_SHARE, EXPLORE_START, GROWTH, Auto, AutoState, DraftPolicy,
                                      cost_table)
from edge_mtp.strategies.lookup import BUCKET_START, LONGEST, Lookup, MatchAcceptance, bucket, continues_word

REPEATING = [{"role": "user", "content": "Repeat exactly, twice: the quick brown fox jumps over the "
                                         "lazy dog while the small cat sleeps on the warm red mat."}]


def curve(cost_of_n) -> Profile:
    return Profile("test", list(GRID), [float(cost_of_n(n)) for n in GRID], 10.0)


CHEAP = curve(lambda n: 1.0 + 0.01 * (n - 1))  # rows nearly free (a memory-bound model)
DEAR = curve(lambda n: float(n))               # every row costs a full step (nothing can pay)


def test_lookup_match_length_counts_the_shared_suffix():
    lk = Lookup()
    lk.start([5, 1, 2, 3, 4, 9, 9, 1, 2, 3])
    match, draft, _ = lk.find(3)
    assert (match, draft) == (3, [4, 9, 9])
    lk.start([7, 1, 2, 3, 4, 9, 7, 1, 2, 3])
    assert lk.find(2)[:2] == (4, [4, 9])  # "7 1 2 3" occurred before: a 4-token match
    lk.start([1, 2, 3])
    assert lk.find(4)[:2] == (0, [])


def test_lookup_support_counts_what_followed_the_matched_ngram():
    lk = Lookup()
    lk.start([7, 1, 5, 9, 1, 5, 9, 1, 6, 2, 1])
    match, draft, support = lk.find(2)
    assert draft == [6, 2] and match == 1  # the latest "1" was followed by 6
    assert support == (1, 3)  # "1" was followed by 5, 5 and 6: the draft's 6 once of three
    lk.start([4, 8, 3, 4, 8, 3, 4, 8, 3, 4, 8])
    assert lk.find(1) == (8, [3], (2, 2))  # "3 4 8" always followed by 3
    lk.start([1, 2, 3])
    assert lk.find(4) == (0, [], (0, 0))


def test_match_length_buckets_cover_every_length():
    lengths = np.arange(1, LONGEST + 40)
    b = bucket(lengths)
    assert b[0] == 0 and (np.diff(b) >= 0).all() and b[-1] == len(BUCKET_START) - 1
    assert (BUCKET_START[b] <= np.minimum(lengths, LONGEST)).all()
    assert bucket(12) == 11 and bucket(13) == bucket(16) and bucket(500) == bucket(LONGEST)


def test_acceptance_rises_with_match_length_agreement_and_word_continuation():
    acc = MatchAcceptance()
    assert acc.at(1) < acc.at(5) < acc.at(20) < acc.at(60)
    plain = acc.along(2, 3)
    split_word = acc.along(2, 3, [False, False, False], (1, 4))
    agreed_cont = acc.along(2, 3, [True, True, True], (3, 3))
    assert split_word[0] < plain[0] < agreed_cont[0]
    assert split_word[1] < plain[1] < agreed_cont[1]  # later tokens: word start vs continuation
    assert max(agreed_cont) < 1 and min(split_word) > 0


def test_acceptance_learns_a_request_offset_from_tested_tokens():
    hits, misses = MatchAcceptance(), MatchAcceptance()
    for _ in range(20):
        hits.learn(2, [5, 6, 7], [5, 6, 7, 1])  # three tested, all right
        misses.learn(2, [5, 6, 7], [9])  # the first one wrong: the rest untested
    assert hits.offset > 0 > misses.offset
    assert hits.at(2) > MatchAcceptance().at(2) > misses.at(2)
    frozen = MatchAcceptance(rate=0.0)
    frozen.learn(2, [5], [9])
    assert frozen.offset == 0.0


def test_policy_drafts_long_only_on_a_long_agreed_match_under_a_dear_curve():
    dear = curve(lambda n: 1.0 + 0.9 * (n - 1) ** 0.8)  # about the default model's 2-core curve
    policy = DraftPolicy(cost_table(dear))
    policy.cap = 10
    conts = [True] * 10
    assert policy.choose(1, 10, [False] * 10, (1, 5)) == 0  # a 1-token match seen with 5 followers
    assert policy.choose(60, 10, conts, (4, 4)) >= 6  # copying a passage: a long draft
    policy.cap = 2
    assert policy.choose(60, 10, conts, (4, 4)) == 2  # slow start caps it
    policy.learn(60, [1, 2], [1, 2, 3])
    assert policy.cap == 2 * GROWTH  # a fully accepted draft grows the cap
    policy.learn(60, [1, 2, 3], [9])
    assert policy.cap == GROWTH  # a rejected first token halves it
    policy.learn(60, [1], [9], verified=False)
    assert policy.cap == GROWTH  # a plain step's test of the first token teaches acceptance only
    assert policy.acceptance.offset < 0


def test_continues_word():
    assert continues_word(b"ing") and continues_word(b"7")
    assert not continues_word(b" the") and not continues_word(b",") and not continues_word(b"")


def test_policy_prefers_tokens_per_time_over_tokens_per_step():
    """Four 11-row passes beat one 65-row pass when rows cost their share: a long draft only where
    the curve flattens."""
    steep = DraftPolicy(cost_table(curve(lambda n: 0.6 * n)))  # 65 rows cost 39 plain steps
    flat = DraftPolicy(cost_table(curve(lambda n: 1.0 + 0.05 * (n - 1))))
    for policy in (steep, flat):
        policy.cap = 64
    conts = [True] * 64
    assert 0 < steep.choose(60, 64, conts, (4, 4)) < 64
    assert flat.choose(60, 64, conts, (4, 4)) == 64


ITEMS = ("apple, banana, cherry, grape, lemon, mango, orange, peach, pear, plum, kiwi, lime, fig, "
         "date, melon, berry")
COPYING = f"The list: {ITEMS}. Again: {ITEMS}. Again: apple,"  # the answer copies a 40-token list


def test_auto_drafts_long_when_rows_are_cheap(engine):
    cheap = engine.generate(COPYING, max_tokens=64, temperature=0, strategy="auto",
                            strategy_options={"profile": CHEAP, "state": AutoState()})["speculation"]
    assert cheap["steps_by_kind"]["draft"] > 0 and cheap["mean_accepted_tokens_per_step"] > 1.3
    assert cheap["mean_draft_length"] > 2  # long matches on a repeat earn long drafts
    assert cheap["longest_draft"] > 10  # the slow-start cap grows past the old limit of 10
    assert "decision" in cheap and "masks off" in cheap["decision"]


def exploration_bound(spec: dict, state: AutoState) -> float:
    """What exploring may have lost: the start credit, its share of decode time, one overshoot."""
    return EXPLORE_START + EXPLORE_SHARE * state.decode_cost + max(spec["row_cost"].values(), default=0)


def test_a_dear_curve_is_disproved_by_bounded_exploration(engine):
    """A curve that prices every row at a full step says drafting never pays; auto tests short
    drafts anyway (within its credit), and what they measure replaces the curve."""
    state = AutoState()
    dear = engine.chat(REPEATING, max_tokens=64, temperature=0, strategy="auto",
                       strategy_options={"profile": DEAR, "state": state})["speculation"]
    assert dear["explored_steps"] >= 1 and dear["steps_by_kind"]["draft"] >= dear["explored_steps"]
    timed = {int(n): c for n, c in dear["row_cost"].items()}
    assert timed and all(c != DEAR.cost_of(n) for n, c in timed.items())  # measured, not the prior
    assert dear["exploration_loss"] <= exploration_bound(dear, state)
    assert dear["row_cost_prior"] == {str(n): DEAR.cost_of(n) for n in timed}


def test_what_exploration_measures_replaces_a_dear_curve(engine):
    """The test above without the machine's timing noise (one stalled pass there can look dear):
    auto replays the model's own greedy answer with DEAR as its prior while the device charges
    CHEAP's prices (tools/auto_replay drives the same policy object); the explored passes' times
    re-price the curve, and auto then drafts for real."""
    replay = load_tool("auto_replay")
    prompt = engine.model.chat_tokens(REPEATING)
    answer, eos = replay.greedy(engine, prompt, 64)
    auto = Auto(profile=DEAR, state=AutoState())
    replay.replay_turn({"prompt": prompt, "answer": answer, "eos": eos}, DEAR, engine.model.piece,
                       device=CHEAP, auto=auto)
    spec = auto.stats()
    timed = {int(n): c for n, c in spec["row_cost"].items()}
    assert spec["explored_steps"] >= 1
    assert timed and all(c < 0.8 * DEAR.cost_of(n) for n, c in timed.items() if n >= 3)
    assert spec["steps_by_kind"]["draft"] > spec["explored_steps"]


def test_an_optimistic_curve_is_corrected_within_the_request(engine):
    free = curve(lambda n: 1.0)  # every row priced at nothing
    spec = engine.chat(REPEATING, max_tokens=64, temperature=0, strategy="auto",
                       strategy_options={"profile": free, "state": AutoState()})["speculation"]
    assert spec["steps_by_kind"]["draft"] > 0
    timed = {int(n): c for n, c in spec["row_cost"].items()}
    assert timed and all(c > 1.2 for c in timed.values())  # extra rows cost something on any CPU
    assert spec["row_cost_scale"] > 2


def test_what_auto_learns_carries_to_the_engines_next_request(engine):
    state = AutoState()
    options = {"profile": CHEAP, "state": state}
    first = engine.chat(REPEATING, max_tokens=32, temperature=0, strategy="auto",
                        strategy_options=options)["speculation"]
    estimate, offset = state.estimate, state.offset
    steps = estimate.steps
    assert offset == pytest.approx(first["acceptance_offset"], abs=1e-3) and offset != 0.0
    second = engine.chat(REPEATING, max_tokens=32, temperature=0, strategy="auto",
                         strategy_options=options)["speculation"]
    assert (first["requests_learned_from"], second["requests_learned_from"]) == (1, 2)
    assert state.estimate is estimate and estimate.steps > steps  # one estimate, both requests
    assert state.offset == pytest.approx(second["acceptance_offset"], abs=1e-3)


def test_a_poisoned_cached_profile_is_corrected_and_outvoted(model_path, tmp_path, monkeypatch):
    """The stale-profile failure: a cached curve priced at 3x what rows cost. A request moves
    the live estimate to the measured cost, writes it back, and the next process starts from the
    median of the calibration and the runs, which two honest runs win."""
    from edge_mtp import Engine

    monkeypatch.setenv("EDGE_MTP_CACHE", str(tmp_path))
    with Engine(str(model_path), n_ctx=1024, n_threads=2) as e:
        honest = e.calibrate(rounds=1)
        poisoned = Profile(profile_key(e.session), list(GRID), [1.0] + [3 * c for c in honest.cost[1:]],
                           honest.step_ms)
        save_profile(poisoned)
        for run in range(2):  # two processes' worth of runs (a fresh state each)
            state = AutoState()
            spec = e.generate(COPYING, max_tokens=64, temperature=0,
                              strategy_options={"state": state})["speculation"]
            timed = {int(n): c for n, c in spec["row_cost"].items()}
            assert timed, spec  # it explored
            for n, c in timed.items():
                assert c < 0.7 * poisoned.cost_of(n)  # moved toward the measured cost
            assert spec["exploration_loss"] <= exploration_bound(spec, state)
        cached = load_profile(e.session)
        assert cached.cost == poisoned.cost and len(cached.runs) == 2  # written back, calibration kept
        prior = cached.prior()
        assert not cached.calibration_counts()  # two runs agreeing it is 3x off outvote it
        for n in (2, 3, 8, 64):  # the next process starts near the truth, timed counts or not
            assert prior.cost_of(n) < 0.7 * poisoned.cost_of(n)


def test_the_prior_is_a_median_that_one_busy_run_cannot_move():
    calibrated = Profile("p", [1, 2, 8], [1.0, 2.0, 5.0], 10.0)
    run = lambda rid, ms, c2: {"id": rid, "step_ms": ms, "cost": {"2": c2}}  # noqa: E731
    calibrated.runs = [run("a", 10.2, 1.9), run("b", 9.8, 2.1), run("busy", 25.0, 6.0)]
    prior = calibrated.prior()
    assert prior.cost_of(2) == pytest.approx(2.05)  # median of 2.0, 1.9, 2.1 and 6.0
    assert prior.step_ms == pytest.approx(10.1)
    assert prior.cost_of(8) == pytest.approx(5.0, rel=0.1)  # untimed: the calibrated shape
    stale = Profile("p", [1, 2, 8], [1.0, 2.66, 7.0], 24.0, runs=[run("a", 10.2, 1.9), run("b", 9.8, 2.1)])
    assert not stale.calibration_counts()  # its plain step was 2.4x the runs': another machine state
    assert stale.prior().cost_of(2) == pytest.approx(2.0)  # the runs alone
    assert stale.prior().cost_of(8) < 6.0  # the untimed count scaled as the runs scale the curve
    dear = Profile("p", [1, 2, 8], [1.0, 6.0, 15.0], 10.0, runs=[run("a", 10.2, 1.9), run("b", 9.8, 2.1)])
    assert not dear.calibration_counts()  # both runs find its rows 5x dearer than they are
    assert dear.prior().cost_of(2) == pytest.approx(2.0) and dear.prior().cost_of(8) < 6.0
    untrusted = Profile("p", [1, 2, 8], [1.0, 2.66, 7.0], 10.0, trusted=False, runs=[run("a", 10.2, 1.9)])
    assert untrusted.prior().cost_of(2) == pytest.approx(1.9)


def test_calibration_throws_away_disturbed_pairs():
    pairs = [(("rows", 2), 10.0, 2.0), (("rows", 2), 10.5, 2.1), (("rows", 2), 30.0, 1.2),
             (("rows", 4), 9.8, 3.0), (("rows", 4), 10.1, 3.1)]
    ratios, steps, dropped = robust_ratios(pairs)
    assert ratios[("rows", 2)] == [2.0, 2.1] and dropped == pytest.approx(0.2)
    assert 30.0 not in steps
    busy = [(("rows", 2), 30.0, 1.2), (("rows", 4), 10.0, 3.0), (("rows", 4), 10.0, 3.0)]
    assert robust_ratios(busy)[0][("rows", 2)] == [1.2]  # every pair disturbed: all kept


def test_auto_without_room_to_calibrate_is_plain(model_path):
    from edge_mtp import Engine

    with Engine(str(model_path), n_ctx=128, n_threads=2) as e:
        r = e.generate("one two three one two three one two", max_tokens=16, temperature=0)
        assert r["speculation"]["strategy"] == "auto"
        assert r["speculation"]["drafted"] == 0  # no profile: plain steps only
        assert "no device profile" in r["speculation"]["decision"]
        assert r["tokens"] == e.generate("one two three one two three one two", max_tokens=16,
                                         temperature=0, strategy="plain")["tokens"]


def test_sampling_with_a_seed_gives_plains_tokens_whatever_was_drafted(engine):
    """One uniform per emitted token (Sampler.draw), and the verifier emits the drawn token: with
    exact rows a seeded sampled answer is plain's, token for token, however auto's live estimate
    (which depends on timing) chose its drafts."""
    plain = engine.generate(COPYING, max_tokens=40, temperature=0.7, seed=3, strategy="plain")
    for strategy, options in (("auto", {"profile": CHEAP}), ("auto", {"profile": CHEAP}),
                              ("lookup", {}), ("hybrid", {})):
        r = engine.generate(COPYING, max_tokens=40, temperature=0.7, seed=3, strategy=strategy,
                            strategy_options=options)
        assert r["tokens"] == plain["tokens"], strategy
    assert r["speculation"]["accepted"] > 0  # drafts were verified, not skipped
    other = engine.generate(COPYING, max_tokens=40, temperature=0.7, seed=4, strategy="plain")
    assert other["tokens"] != plain["tokens"]  # the seed decides


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
    assert len(prof["spread"]) == len(GRID) and isinstance(prof["trusted"], bool)
    assert list((tmp_path / "profiles").glob("*.json"))
    show = subprocess.run([sys.executable, "-m", "edge_mtp.cli", "calibrate", "-m", str(model_path),
                           "-t", "2", "--show"], capture_output=True, text=True,
                          env={**__import__("os").environ, "EDGE_MTP_CACHE": str(tmp_path)}, timeout=300)
    assert show.returncode == 0 and "recent runs" in show.stdout and "| cost |" in show.stdout


def test_replay_tool_follows_plain_decoding_and_prices_drafts_by_the_curve(engine):
    replay = load_tool("auto_replay")
    text = ("The list: apple, banana, cherry, grape, lemon, mango. Again: apple, banana, cherry, "
            "grape, lemon, mango. Again: apple,")
    prompt = engine.tokenize(text)
    answer, eos = replay.greedy(engine, prompt, 48)
    plain = engine.generate(text, max_tokens=48, temperature=0, strategy="plain")
    assert answer == plain["tokens"] and eos == (plain["choices"][0]["finish_reason"] == "stop")
    turn = {"prompt": prompt, "answer": answer, "eos": eos}
    piece = engine.model.piece
    tokens, spent_dear, steps = replay.replay_turn(turn, DEAR, piece)
    assert tokens == len(answer) - 1 and steps == len(answer) - 1 + eos
    # nothing pays on the dear curve: plain steps, and exploration within its credit
    plain_cost = steps * (1 + DraftPolicy(cost_table(DEAR)).overhead["plain"])
    assert abs(spent_dear - plain_cost) <= EXPLORE_START + EXPLORE_SHARE * spent_dear + 0.5
    _, spent_cheap, _ = replay.replay_turn(turn, CHEAP, piece)
    _, spent_oracle, _ = replay.replay_turn(turn, CHEAP, piece, oracle=True)
    assert spent_cheap < 0.9 * spent_dear  # the repeated list is drafted when rows are cheap
    assert spent_oracle <= spent_cheap


def test_calibration_inside_a_request_keeps_the_prompt_cache(model_path, tmp_path, monkeypatch):
    """The first auto request on a machine measures the device; it does so on a scratch context,
    so the serving context's cached prompt prefix is still re-used by that very request."""
    from edge_mtp import Engine
    from edge_mtp.backend import Session

    monkeypatch.setenv("EDGE_MTP_CACHE", str(tmp_path))  # no profile yet
    with Engine(str(model_path), n_ctx=1024, n_threads=2) as e:
        first = e.chat(REPEATING, max_tokens=8, temperature=0, strategy="plain")
        decoded, real = [], Session.decode

        def counting(self, tokens, *a, **kw):
            if self is e.session:
                decoded.append(len(tokens))
            return real(self, tokens, *a, **kw)

        monkeypatch.setattr(Session, "decode", counting)
        r = e.chat(REPEATING, max_tokens=8, temperature=0)  # auto: measures, then answers
        assert list((tmp_path / "profiles").glob("*.json"))  # it did measure, in this request
        assert decoded[0] == 1  # the prompt pass evaluated only its last token: the prefix was kept
        assert r["tokens"] == first["tokens"]
        held = list(e.session.tokens)
        assert e.calibrate(rounds=1).rows == list(GRID)
        assert e.session.tokens == held  # Engine.calibrate keeps the cache too
