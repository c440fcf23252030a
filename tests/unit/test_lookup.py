"""Prompt lookup (`tandem.decoding.lookup`): the drafts it finds, and rounds it serves in the drafter worker between
model rounds: greedy output stays the primary's, and the drafter's cache stays what the model rounds need."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from conftest import TINY, make_engine

from tandem.config import SamplingParams, SpecConfig
from tandem.decoding.engine import Engine
from tandem.decoding.lookup import LookupConfig, lookup_drafts
from tandem.decoding.rounds import Drafts
from tandem.decoding.workers import DrafterWorker, _DrafterSession

PROMPTS = [list(np.random.default_rng(100 + i).integers(0, TINY.vocab_size, size=4 + i % 9)) for i in range(12)]


# --- lookup_drafts ---


def test_lookup_takes_the_newest_occurrence_of_the_longest_suffix() -> None:
    cfg = LookupConfig(min_ngram=2, max_ngram=4)
    #         0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [5, 1, 2, 3, 9, 1, 2, 7, 0, 1, 2, 3]
    # [1, 2, 3] occurred at 1..3 (followed by 9, 1, 2, ...); [2, 3] only there too; the 4-gram [0, 1, 2, 3] never.
    assert lookup_drafts(tokens, 3, cfg) == [9, 1, 2]
    # Suffix [1, 2]: the newest earlier occurrence (5..6) wins over the older one (1..2).
    assert lookup_drafts(tokens[:-1], 2, cfg) == [7, 0]
    assert lookup_drafts(tokens, 1, cfg) == [9]  # at most n_drafts
    assert lookup_drafts([*tokens, 4], 3, cfg) == []  # [3, 4] never occurred: no match of at least 2 tokens
    assert lookup_drafts([*tokens, 4], 3, LookupConfig(min_ngram=0)) == []  # off
    assert lookup_drafts([1, 1, 1], 4, LookupConfig(min_ngram=1)) == [1]  # the drafts end where the tokens do
    assert lookup_drafts([], 4, cfg) == [] and lookup_drafts([3], 4, LookupConfig(min_ngram=1)) == []


def test_lookup_config_from_the_request() -> None:
    assert LookupConfig.shortest(3) == LookupConfig(min_ngram=3, max_ngram=6)
    assert LookupConfig.shortest(9) == LookupConfig(min_ngram=9, max_ngram=9)
    assert not LookupConfig.shortest(0).enabled
    with pytest.raises(ValueError, match="lookup_ngram"):
        SpecConfig(lookup_ngram=-1)


# --- rounds served by lookup in the drafter worker ---


def _spy(worker: DrafterWorker, record: Callable[[_DrafterSession, int, Drafts, bool], None]) -> None:
    """Calls record(session state, max drafts, drafts, looked up) after every round the worker answers, until
    `del worker.start, worker.advance`."""
    start, advance = worker.start, worker.advance

    def after(session: str, max_drafts: int, before: int, drafts: Drafts) -> Drafts:
        st = worker.pool.sessions[session]
        assert isinstance(st, _DrafterSession)
        record(st, max_drafts, drafts, worker.lookup_rounds > before)
        return drafts

    def spy_start(session, prompt_ids, hidden, first_token, max_drafts):
        before = worker.lookup_rounds
        return after(session, max_drafts, before, start(session, prompt_ids, hidden, first_token, max_drafts))

    def spy_advance(session, accepted, hidden, next_token, max_drafts, skipped=()):
        before = worker.lookup_rounds
        drafts = advance(session, accepted, hidden, next_token, max_drafts, skipped)
        return after(session, max_drafts, before, drafts)

    worker.start = spy_start  # type: ignore[method-assign]
    worker.advance = spy_advance  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "spec",
    [
        SpecConfig(gamma_max=1, tau=0.8, lookup_ngram=1),  # the shipped γ: lookup gives one draft
        SpecConfig(gamma_max=4, tau=0.0, lookup_ngram=1),
        SpecConfig(gamma_max=4, tau=0.0, lookup_ngram=2, min_accepted=2.0, pause_steps=2),  # pauses between
        SpecConfig(gamma_max=5, tau=0.5, tau_first=0.9, lookup_ngram=3),  # declined model rounds between
    ],
)
def test_greedy_with_lookup_is_lossless(tiny_engine: Engine, spec: SpecConfig) -> None:
    for mode in ("speed", "tandem-speed"):
        worker = tiny_engine.drafters[mode]
        assert worker is not None
        served, drafts = worker.lookup_rounds, worker.lookup_drafts
        model_rounds = looked_up = looked_up_drafts = 0
        for prompt in PROMPTS:
            want = tiny_engine.generate(prompt, mode="primary", max_tokens=64)
            got = tiny_engine.generate(prompt, mode=mode, max_tokens=64, spec=spec)
            assert got.token_ids == want.token_ids, (mode, prompt)
            s = got.stats
            assert s.rounds <= s.drafted_tokens <= spec.gamma_max * s.rounds
            assert s.drafter_calls == s.rounds + s.declined_rounds
            assert s.lookup_accepted_tokens <= s.lookup_drafted_tokens <= s.drafted_tokens
            model_rounds += s.drafter_calls - s.lookup_rounds
            looked_up += s.lookup_rounds
            looked_up_drafts += s.lookup_drafted_tokens
        # The requests' counters are the worker's; both kinds of round ran: lookup's and the model's.
        assert (looked_up, looked_up_drafts) == (worker.lookup_rounds - served, worker.lookup_drafts - drafts), mode
        assert looked_up > 0 and model_rounds > 0 and looked_up <= looked_up_drafts <= spec.gamma_max * looked_up


def test_standalone_tandem_never_looks_up(tiny_engine: Engine) -> None:
    """Standalone Tandem keeps its drafts unverified: lookup's guesses would change its output."""
    worker = tiny_engine.drafters["tandem"]
    assert worker is not None
    served = worker.lookup_rounds
    plain, lookup = SpecConfig(gamma_max=3, tau=0.0), SpecConfig(gamma_max=3, tau=0.0, lookup_ngram=1)
    for prompt in PROMPTS[:4]:
        want = tiny_engine.generate(prompt, mode="tandem", max_tokens=40, spec=plain)
        got = tiny_engine.generate(prompt, mode="tandem", max_tokens=40, spec=lookup)
        assert got.token_ids == want.token_ids
    assert worker.lookup_rounds == served


def _sequence(seed: int, n: int = 72) -> list[int]:
    """Random tokens with stretches copied from earlier on: lookup finds those (and coincidental 2-grams)."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, TINY.vocab_size, size=n).tolist()
    for at, src, length in ((18, 4, 7), (40, 22, 6), (58, 8, 8)):
        seq[at : at + length] = seq[src : src + length]
    return [int(t) for t in seq]


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize(
    ("mode", "reads"), [("speed", "layers"), ("tandem-speed", "layers"), ("tandem-speed", "features")]
)
def test_model_rounds_after_lookup_rounds_draft_as_a_fresh_session(
    tiny_params, mode: str, reads: str, sampled: bool
) -> None:
    """A model round of a session that had lookup rounds drafts what a session started fresh on the whole sequence so
    far drafts: lookup rounds leave the drafter's cache as the next model round needs it (a Tandem drafter holds the
    primary's states of every position before the looked-up round's t_0; a vanilla one feeds its backlog, and so does a
    feature-level one, with the states its session kept).

    The worker is driven along a fixed sequence (each round keeps the drafts that match it), the primary's states of
    it taken once, so both sessions get the same inputs. Greedy rounds draft on device (Tandem: the states written in
    the drafting call), sampled ones on the host (their first proposal q_1, a distribution, is compared)."""
    engine = make_engine(tiny_params, slots=2, reads=reads)
    worker = engine.drafters[mode]
    assert worker is not None
    spec = SpecConfig(gamma_max=3, tau=0.0, lookup_ngram=2)
    sampling = SamplingParams(temperature=1.0, seed=0) if sampled else SamplingParams()
    checked = served = 0
    for seed in range(3):
        seq = _sequence(seed)
        states = None
        if worker.tandem:  # the primary's states of every position, from one prefill
            states = engine.primary_worker.prefill("states", seq, SamplingParams(), True).hidden
            engine.primary_worker.release("states")
        session = worker.open("driven", sampling, spec)
        m, n0 = 10, 10  # m: the round's t_0
        drafts = session.start(seq[:m], None if states is None else states[:m], seq[m], spec.gamma_max)
        looked_up_before = False
        while True:
            st = worker.pool.sessions["driven"]
            assert isinstance(st, _DrafterSession) and st.tokens == seq[: m + 1] and st.round_start == m
            length = int(worker.runner.lengths[st.slot])
            looked_up = worker.lookup_rounds > served
            served = worker.lookup_rounds
            if looked_up:
                # Nothing fed: a Tandem drafter's cache holds exactly the positions before t_0, a vanilla one's no more.
                if worker.tandem and not worker.runner.cfg.features:
                    assert length == m
                else:
                    assert length <= m and (worker.tandem or n0 <= length)
                assert drafts.tokens == lookup_drafts(seq[: m + 1], spec.gamma_max, LookupConfig.shortest(2))
            elif looked_up_before and drafts.tokens and checked < 8:
                fresh = worker.open("fresh", sampling, spec)
                try:
                    want = fresh.start(seq[:m], None if states is None else states[:m], seq[m], spec.gamma_max)
                finally:
                    fresh.close()
                _assert_same_drafting(drafts, want, sampled)
                checked += 1
            looked_up_before |= looked_up
            accepted = 0
            while accepted < len(drafts.tokens) and drafts.tokens[accepted] == seq[m + 1 + accepted]:
                accepted += 1
            nxt = m + 1 + accepted  # the position of the next round's t_0
            if nxt + 1 + spec.gamma_max >= len(seq):
                break
            hidden = None if states is None else states[m:nxt]
            drafts = session.advance(accepted, hidden, seq[nxt], spec.gamma_max)
            m = nxt
        session.close()
    assert checked >= 4 and served >= 4


def _assert_same_drafting(got: Drafts, want: Drafts, sampled: bool) -> None:
    if not sampled:
        assert got.tokens == want.tokens
        return
    # The same q_1 up to float rounding (a fresh start runs the prefix as one block), which may swap near-tied tokens
    # at the top-K's edge.
    q, r = got.proposals[0], want.proposals[0]
    got_p, want_p = dict(zip(q.ids.tolist(), q.probs, strict=True)), dict(zip(r.ids.tolist(), r.probs, strict=True))
    common = got_p.keys() & want_p.keys()
    assert len(common) >= len(want_p) - 2
    np.testing.assert_allclose([got_p[t] for t in common], [want_p[t] for t in common], rtol=1e-4, atol=1e-7)


def test_sampled_lookup_rounds_propose_point_masses(tiny_params) -> None:
    engine = make_engine(tiny_params)
    worker = engine.drafters["tandem-speed"]
    assert worker is not None
    proposals: list[Drafts] = []
    _spy(worker, lambda st, n, drafts, looked_up: proposals.append(drafts) if looked_up else None)
    sampling = SamplingParams(temperature=1.0, seed=3)
    spec = SpecConfig(gamma_max=3, tau=0.0, lookup_ngram=1)
    a = engine.generate(PROMPTS[1], mode="tandem-speed", max_tokens=40, sampling=sampling, spec=spec).token_ids
    del worker.start, worker.advance
    assert proposals
    for d in proposals:
        assert [int(q.ids[0]) for q in d.proposals] == d.tokens
        assert all(q.ids.size == 1 and q.probs.tolist() == [1.0] for q in d.proposals)
    b = engine.generate(PROMPTS[1], mode="tandem-speed", max_tokens=40, sampling=sampling, spec=spec).token_ids
    assert a == b  # lookup draws nothing from the request's generators: a seeded request repeats
