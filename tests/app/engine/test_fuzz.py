"""Property-based fuzzing of the engine (hypothesis): random mixes of good and bad rows, stances and blends,
sampling parameters, staggered arrivals and cancellations, run together on one engine.

Invariants checked after every example:

* a good row (greedy, or seeded sampling, with random penalties, logit_bias and stop strings) gets exactly
  the tokens, text and finish reason it gets when run alone (alone outputs are cached per engine, keyed by
  prompt, stance and sampling parameters);
* a bad row gets exactly one :class:`ErrorEvent` and no :class:`FinishEvent`; the tokens it streamed before
  failing are a prefix of its output alone. Bad rows: ``fault_hook`` raising at a random stage after a random
  number of calls (``detokenize`` is raised on the consumer side, by the request's stream), a blend weight of
  1e30 (non-finite logits), a seed torch refuses, an adapter that cannot go into a slot (alone or after a
  good term of the same blend), a blend needing more slots than the engine has;
* a cancelled row (cancelled after k events) ends with one ``FinishEvent("cancelled")`` after a prefix of its
  output alone, or completes normally if it was already done; never with an error;
* every stream hands out tokens then exactly one terminal event; on the engine side (seen by a listener),
  every request gets at most one ``AdmittedEvent`` before its tokens, then exactly one terminal event, last,
  whose usage counts match; an error the consumer sees is the engine's own unless the consumer raised it
  (detokenisation), and then the engine ended the row without an error;
* no leaks: afterwards nothing runs, waits or prefills, no KV block is referenced (the prefix cache may keep
  unreferenced ones), every slot pin is released, and the slots are partitioned between free and resident ones;
  the engine thread is still alive.

Four engines (module-scoped), with few adapter slots (1, 2 or 3: eviction and waiting for a slot happen)
and at most 4 rows per batch (admission queuing happens); two prefill in chunks (5 and 16 tokens), and one has
a KV cache of 4 blocks, too few for the rows it admits to grow, so rows are preempted mid-decode and resumed (their
tokens must still equal their tokens alone) and wait for blocks at admission.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from app.engine.engine import Engine
from app.engine.request import AdmittedEvent, ErrorEvent, FinishEvent, PreemptedEvent, Stance, TokenEvent
from app.engine.sampling import SamplingParams
from app.errors import GenerationError, InternalError, InvalidRequestError, StanceServeError
from app.registry.adapter import AdapterWeights, LoRAModuleWeights
from tests.factories import FakeStore, block_bytes, build_tiny_model, make_engine, write_peft_adapter

ADAPTERS = ("a1", "a2", "a3")
STAGES = ("admission", "prefill", "decode", "sampling", "detokenize")
PROMPTS = (
    (1,),
    (1, 200),
    (1, 300, 12),
    (1, 45, 80, 99),
    (1, 9, 9, 9, 9),
    (1, 7, 8, 9, 10, 11),
    (1, 30, 31, 32, 33, 34, 35, 36, 37),
    (1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18),
    (1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72),
    (1, 90, 3, 91, 4, 92, 5, 93, 6, 94, 7, 95, 8, 96, 9),
)
WEIGHTS = (-1.0, -0.5, 0.3, 0.7, 1.3)
MAX_TOKENS = 8
#: (prefill_chunk_tokens, max_loras, KV blocks or None for the default budget) of the engines under test; in
#: 4 blocks of 16 tokens, admission takes 3 one-block rows (one block kept free), and when two of them grow into a
#: second block in the same step (15 prompt + 8 new tokens take 2) the newest is preempted and resumed
CONFIGS = {"chunk512-2slots": (512, 2, None), "chunk5-3slots": (5, 3, None), "chunk16-1slot": (16, 1, None),
           "chunk512-2slots-4blocks": (512, 2, 4)}

_ids = itertools.count()


class Injected(RuntimeError):
    """The fault a hook injects."""


# ---------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One request of an example.

    Attributes:
        prompt: token ids.
        stance: ``("base",)``, ``("adapter", name)`` or ``("blend", ((name, weight), ...))``.
        sampling: keyword arguments of :class:`SamplingParams`, as a sorted tuple of pairs.
        bad: ``None`` (good row), ``("hook", stage, after)``, ``("huge", adapter, other_term)``,
            ``("seed",)`` or ``("broken", good_term)``.
        cancel_after: cancel the stream after this many events (``None``: never).
        delay: seconds to wait before opening the stream.
    """

    prompt: tuple[int, ...]
    stance: tuple
    sampling: tuple
    bad: tuple | None = None
    cancel_after: int | None = None
    delay: float = 0.0

    @property
    def params(self) -> dict:
        return dict(self.sampling)

    def n_slots(self) -> int:
        """Adapter slots the row's stance needs at once (see :func:`build_stance`)."""
        if self.bad is not None and self.bad[0] == "huge":
            return 1 + bool(self.bad[2] and self.bad[2] != self.bad[1])
        if self.bad is not None and self.bad[0] == "broken":
            return 1 + bool(self.bad[1])
        kind = self.stance[0]
        return 0 if kind == "base" else 1 if kind == "adapter" else len(self.stance[1])


stances = st.one_of(
    st.just(("base",)),
    st.sampled_from(ADAPTERS).map(lambda n: ("adapter", n)),
    st.lists(st.sampled_from(ADAPTERS), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.tuples(*(st.sampled_from(WEIGHTS) for _ in names)).map(
            lambda ws: ("blend", tuple(zip(names, ws)))
        )
    ),
)


@st.composite
def samplings(draw, *, allow_stop: bool = True) -> tuple:
    p: dict = {"max_tokens": draw(st.integers(1, MAX_TOKENS))}
    if draw(st.booleans()):
        p["temperature"] = 0.0
    else:  # seeded sampling: deterministic alone, whatever shares the batch
        p["temperature"] = draw(st.sampled_from([0.7, 1.0, 1.5]))
        p["seed"] = draw(st.integers(0, 3))
        p["top_k"] = draw(st.sampled_from([0, 5, 50]))
        p["top_p"] = draw(st.sampled_from([1.0, 0.9]))
    if draw(st.integers(0, 3)) == 0:
        p["repetition_penalty"] = draw(st.sampled_from([0.8, 1.3]))
        p["frequency_penalty"] = draw(st.sampled_from([0.0, 0.7]))
        p["presence_penalty"] = draw(st.sampled_from([0.0, -0.5]))
    if draw(st.integers(0, 4)) == 0:
        p["logit_bias"] = ((draw(st.integers(3, 511)), draw(st.sampled_from([-5.0, 5.0]))),)
    if allow_stop and draw(st.integers(0, 4)) == 0:
        p["stop"] = (draw(st.sampled_from(["e", " ", "t", "K", "he"])),)  # common in the tiny model's text
    if allow_stop and draw(st.integers(0, 5)) == 0:  # a stop token forced by logit_bias once min_tokens allows it
        t = draw(st.integers(3, 511))
        p["logit_bias"] = ((t, 100.0),)
        p["stop_token_ids"] = (t,)
        p["min_tokens"] = draw(st.integers(0, 3))
    if draw(st.integers(0, 5)) == 0:
        p["logprobs"] = draw(st.integers(0, 3))
    return tuple(sorted(p.items()))


#: prompts of 14 and 15 tokens: a row grows into its second 16-token block within its first 2 or 3 tokens
LONG_PROMPTS = PROMPTS[8:]


@st.composite
def rows(draw, prompts: tuple = PROMPTS, random_len: tuple[int, int] = (0, 11)) -> Row:
    """A row whose prompt is one of ``prompts`` (mostly: their outputs alone are cached) or BOS and
    ``random_len`` (least, most) random ids."""
    pool = st.sampled_from(prompts)
    lo, hi = random_len
    prompt = draw(st.one_of(pool, pool, st.lists(st.integers(3, 511), min_size=lo, max_size=hi).map(lambda t: (1, *t))))
    kind = draw(st.sampled_from(["good"] * 6 + ["hook"] * 2 + ["huge", "seed", "broken"]))
    bad = None
    stance = draw(stances)
    sampling = draw(samplings(allow_stop=kind == "good"))
    n = dict(sampling)["max_tokens"]
    if kind == "hook":
        stage = draw(st.sampled_from(STAGES))
        if stage == "decode" and n == 1:
            stage = "sampling"  # one token: no decode step
        # calls a row surely gets at a stage: admission and prefill at least 1 (more when waiting for a slot
        # or prefilled in chunks), decode one per token after the first, sampling and detokenize one per token
        most = {"admission": 0, "prefill": 0, "decode": n - 2}.get(stage, n - 1)
        bad = ("hook", stage, draw(st.integers(0, most)))
    elif kind == "huge":
        bad = ("huge", draw(st.sampled_from(ADAPTERS)), draw(st.sampled_from([None, *ADAPTERS])))
    elif kind == "seed":
        bad = ("seed",)
    elif kind == "broken":
        bad = ("broken", draw(st.sampled_from([None, *ADAPTERS])))
    cancel_after = draw(st.one_of(st.none(), st.none(), st.integers(0, n + 1)))
    delay = draw(st.sampled_from([0.0, 0.0, 0.0, 0.005, 0.02]))
    return Row(tuple(prompt), stance, sampling, bad, cancel_after, delay)


# ---------------------------------------------------------------------------------------------- engines
@dataclass
class Setup:
    eng: Engine
    capacity: int
    #: seconds the engine thread sleeps as each example's rows open, so that those without a delay are admitted
    #: together (and grow into the cache's last blocks in the same steps); 0: no hold
    hold_s: float = 0.0
    #: (prompt, stance, sampling) -> (tokens, text, finish reason, completion tokens) of the row run alone
    alone: dict = field(default_factory=dict)
    #: request id -> every event the engine sent for it (recorded by a listener, on the engine thread)
    sent: dict = field(default_factory=dict)

    def listen(self, req, ev) -> None:
        self.sent.setdefault(req.request_id, []).append(ev)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from intra-op threads, and on busy shared cores their spinning makes the
    engine steps up to 10x slower: one thread while this module runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def adapter_store(tmp_path_factory):
    model = build_tiny_model("llama")
    root = tmp_path_factory.mktemp("fuzz")
    dirs = {
        "a1": write_peft_adapter(root / "a1", "llama", model=model, rank=2, seed=1, scale=0.5),
        "a2": write_peft_adapter(root / "a2", "llama", model=model, rank=4, alpha=8, seed=2, scale=0.5),
        "a3": write_peft_adapter(root / "a3", "llama", model=model, rank=8, alpha=16, seed=3, scale=0.4),
    }
    return model, FakeStore(dirs)


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def setup(request, adapter_store, tokenizer):
    chunk, slots, blocks = CONFIGS[request.param]
    model, store = adapter_store
    kv = {} if blocks is None else {"max_model_len": 32, "kv_cache_memory_bytes": (blocks + 1) * block_bytes(model)}
    eng = make_engine(model, tokenizer, store, max_loras=slots, max_batch_size=4, prefill_chunk_tokens=chunk, **kv)
    if blocks is not None:
        assert eng.kv_cache.pool.capacity == blocks
    s = Setup(eng, slots, hold_s=0.0 if blocks is None else 0.02)
    eng.scheduler.listeners.append(s.listen)
    yield s
    eng.stop()


def build_stance(eng, row: Row) -> Stance:
    kind = row.stance[0]
    if kind == "base":
        stance = eng.resolve_stance("tiny")
    elif kind == "adapter":
        stance = eng.resolve_stance(row.stance[1])
    else:
        stance = eng.resolve_stance("tiny", dict(row.stance[1]))
    if row.bad is None or row.bad[0] in ("hook", "seed"):
        return stance

    def weights(name):
        return eng.resolve_stance(name).terms[0][0]

    if row.bad[0] == "huge":  # past the API's bound: built directly
        _, name, other = row.bad
        terms = ((weights(name), 1e30),) + (((weights(other), 0.5),) if other and other != name else ())
    else:
        _, good = row.bad
        terms = (((weights(good), 0.5),) if good else ()) + ((broken_weights(), 1.0),)
    return Stance("blend", terms)


def broken_weights() -> AdapterWeights:
    """A fresh adapter version whose module the base model lacks: writing it into a slot fails."""
    n = next(_ids)
    modules = {"model.layers.0.self_attn.no_such_proj": LoRAModuleWeights(torch.zeros(2, 64), torch.zeros(64, 2), 1.0)}
    try:  # versions named by content digest
        from app.registry.adapter import AdapterVersion
    except ImportError:  # versions named "name@version"
        return AdapterWeights(f"broken@{n}", modules)
    return AdapterWeights(AdapterVersion(f"broken{n}", f"{n:064x}"), modules)


def make_params(row: Row) -> SamplingParams:
    p = row.params
    if row.bad == ("seed",):
        p["seed"] = 2**70  # past torch's range: refused when the row's generator is made, at admission
    if "logit_bias" in p:
        p["logit_bias"] = dict(p["logit_bias"])
    for k in ("stop", "stop_token_ids"):
        if k in p:
            p[k] = list(p[k])
    return SamplingParams(**p)


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    events: list  # what the request's stream handed out
    sent: list  # what the engine sent for the request (its stream may end first: stop string, detokenisation)

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, TokenEvent)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, (TokenEvent, FinishEvent)))

    @property
    def finishes(self) -> list[FinishEvent]:
        return [e for e in self.events if isinstance(e, FinishEvent)]

    @property
    def errors(self) -> list[BaseException]:
        return [e.error for e in self.events if isinstance(e, ErrorEvent)]


def quiet(eng) -> bool:
    s = eng.scheduler
    return s.num_running == 0 and s.num_waiting == 0 and s._group is None and not s._pending


async def run_rows(s: Setup, rows_: list[Row], request_ids: list[str], timeout: float = 30.0) -> list[Outcome]:
    """Open every row (after its delay), read each stream to its end, cancelling where asked; then wait for
    the engine to go quiet (it may still run rows whose stream ended on the consumer side)."""
    eng = s.eng

    async def one(row: Row, rid: str):
        if row.delay:
            await asyncio.sleep(row.delay)
        stream = eng.open(list(row.prompt), make_params(row), build_stance(eng, row), request_id=rid)
        events = []
        if row.cancel_after == 0:
            stream.cancel()
        async for ev in stream:
            events.append(ev)
            if row.cancel_after is not None and len(events) == row.cancel_after:
                stream.cancel()
        return events

    hold = None
    if s.hold_s:
        hold = threading.Thread(target=eng.scheduler.call, args=(lambda: time.sleep(s.hold_s),))
        hold.start()
    done = await asyncio.wait_for(asyncio.gather(*(one(r, i) for r, i in zip(rows_, request_ids))), timeout)
    if hold is not None:
        hold.join()
    for _ in range(3000):  # the engine thread retires rows just after sending their last event, and tells the
        # listeners just after the consumer: wait for both (a missing terminal event fails the checks)
        ended = all(isinstance(s.sent.get(rid, [None])[-1], (FinishEvent, ErrorEvent)) for rid in request_ids)
        if ended and quiet(eng):
            break
        await asyncio.sleep(0.001)
    return [Outcome(events, list(s.sent.pop(rid, []))) for events, rid in zip(done, request_ids)]


def assert_no_leaks(s: Setup) -> None:
    eng = s.eng
    sched, slots = eng.scheduler, eng.slots
    deadline = time.monotonic() + 3
    while not quiet(eng) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.alive, "the engine thread died"
    assert sched.num_running == 0 and sched.num_waiting == 0, (sched.num_running, sched.num_waiting)
    assert sched._group is None and not sched._pending and len(sched._batch) == 0
    pool = eng.kv_cache.pool
    pool.check()  # every block free, evictable (a cached prefix) or referenced, once
    assert pool.in_use == 0, f"{pool.in_use} KV blocks still referenced with no row running"
    assert all(n == 0 for n in slots._refs.values()), f"slot pins leaked: {slots._refs}"
    resident = list(slots._slot_of.values())
    assert len(resident) == len(set(resident)) and not set(resident) & set(slots._free), (resident, slots._free)
    assert sorted(resident + slots._free) == list(range(s.capacity)), (resident, slots._free)


def alone_key(row: Row) -> tuple:
    return row.prompt, row.stance, row.sampling


def alone_output(s: Setup, row: Row) -> tuple[list[int], str, str, int]:
    """(tokens, text, finish reason, completion tokens) of ``row`` run alone on the engine (cached)."""
    key = alone_key(row)
    if key not in s.alone:
        solo = Row(row.prompt, row.stance, row.sampling)
        [out] = asyncio.run(run_rows(s, [solo], [f"alone-{next(_ids)}"]))
        assert not out.errors and len(out.finishes) == 1, out.events
        fin = out.finishes[0]
        s.alone[key] = (out.tokens, out.text, fin.reason, fin.completion_tokens)
    return s.alone[key]


def expects_error(s: Setup, row: Row) -> bool:
    return row.bad is not None or row.n_slots() > s.capacity


def expected_error(s: Setup, row: Row) -> type[StanceServeError]:
    """The error a bad row must get: the first fault it meets decides."""
    kind = row.bad[0] if row.bad is not None else None
    if kind == "hook" and row.bad[1] == "admission":
        return InternalError  # the hook raises before the slots are taken
    if row.n_slots() > s.capacity:
        return InvalidRequestError  # more adapters than slots: refused before any later fault
    if kind == "huge":
        return GenerationError  # non-finite logits
    return InternalError  # the hook raised, torch refused the seed, or writing the slot failed


# ---------------------------------------------------------------------------------------------- the property
def check_stream(row: Row, out: Outcome, where: str) -> None:
    """One request's events: the stream's, and the engine's."""
    # the stream: tokens, then exactly one terminal event (it hands out nothing after it)
    assert out.events, where
    *body, last = out.events
    assert all(isinstance(e, TokenEvent) for e in body), where
    assert isinstance(last, (FinishEvent, ErrorEvent)), where
    # the engine: at most one admission, before any token, then tokens (preemptions between them, each after a
    # token, at the KV positions the row held: its prompt and tokens but the newest), then exactly one terminal
    # event, last
    assert out.sent, where
    *sent_body, sent_last = out.sent
    admitted = [k for k, e in enumerate(sent_body) if isinstance(e, AdmittedEvent)]
    assert admitted in ([], [0]), where
    after = sent_body[len(admitted):]
    assert all(isinstance(e, (TokenEvent, PreemptedEvent)) for e in after), where
    for k, e in enumerate(after):
        if isinstance(e, PreemptedEvent):
            n = sum(isinstance(x, TokenEvent) for x in after[:k])
            assert n >= 1 and e.tokens == len(row.prompt) + n - 1, where
    assert isinstance(sent_last, (FinishEvent, ErrorEvent)), where
    sent_tokens = [e for e in sent_body if isinstance(e, TokenEvent)]
    if sent_tokens:
        assert admitted, where
        assert not any(e.ends for e in sent_tokens[:-1]), where  # only the last token may end the request
    if isinstance(sent_last, FinishEvent):
        assert sent_last.prompt_tokens == len(row.prompt), where
        assert sent_last.completion_tokens == len(sent_tokens), where
    # what the stream shows comes from the engine, in order: its tokens are a prefix of the engine's
    shown = [e for e in body if isinstance(e, TokenEvent)]
    if row.params.get("logprobs") is None:  # the token that ends a request is shown only with its logprob
        assert not any(e.ends for e in shown), where
    assert [e.token_id for e in shown] == [e.token_id for e in sent_tokens[: len(shown)]], where
    if last is not sent_last:  # the stream ended on its own: a stop string, or a failed detokenisation
        assert isinstance(sent_last, FinishEvent), where  # then the engine ended the row without an error
        if isinstance(last, FinishEvent):
            assert last.reason == "stop" and "stop" in row.params, where
        else:
            assert row.bad is not None and row.bad[:2] == ("hook", "detokenize"), where


def check_example(s: Setup, rows_: list[Row]) -> None:
    eng = s.eng
    refs = {i: alone_output(s, r) for i, r in enumerate(rows_)
            if (r.bad is None or r.bad[0] == "hook") and r.n_slots() <= s.capacity}
    rids = [f"fuzz-{next(_ids)}" for _ in rows_]
    plans = {rid: {"stage": r.bad[1], "after": r.bad[2], "calls": 0}
             for rid, r in zip(rids, rows_) if r.bad is not None and r.bad[0] == "hook"}

    def hook(stage, req):
        plan = plans.get(req.request_id)
        if plan is not None and plan["stage"] == stage:
            plan["calls"] += 1
            if plan["calls"] > plan["after"]:
                raise Injected(f"injected at {stage} after {plan['after']} calls")

    eng.scheduler.fault_hook = hook
    try:
        outs = asyncio.run(run_rows(s, rows_, rids))
    finally:
        eng.scheduler.fault_hook = None

    for i, (row, out) in enumerate(zip(rows_, outs)):
        where = f"row {i} of {len(rows_)}: {row}\nevents: {out.events}\nsent by the engine: {out.sent}"
        check_stream(row, out, where)
        ref = refs.get(i)
        if ref is not None:
            assert out.tokens == ref[0][: len(out.tokens)], f"not a prefix of the output alone {ref}\n{where}"
        if expects_error(s, row):
            if row.cancel_after is None or not out.finishes:
                assert len(out.errors) == 1 and not out.finishes, where
                err = out.errors[0]
                assert isinstance(err, expected_error(s, row)), where
                if isinstance(err, InternalError):
                    assert "request id" in err.message, where
            else:  # cancelled before its fault struck
                assert out.finishes[0].reason == "cancelled", where
            continue
        assert not out.errors, where
        fin = out.finishes[0]
        assert fin.prompt_tokens == len(row.prompt), where
        if fin.reason == "cancelled":
            assert row.cancel_after is not None, where
            assert fin.text == "", where
            assert fin.completion_tokens == len(out.tokens), where
        else:
            got = (out.tokens, out.text, fin.reason, fin.completion_tokens)
            assert got == ref, f"differs from alone {ref}\n{where}"
    assert_no_leaks(s)


#: longer local hunts: FUZZ_EXAMPLES=500 FUZZ_RANDOM=1 pytest tests/app/engine/test_fuzz.py
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _greedy(n: int = 6, **kw) -> tuple:
    return tuple(sorted({"max_tokens": n, "temperature": 0.0, **kw}.items()))


#: explicit examples, run first: every kind of row at least once, whatever the random draws give
EXAMPLES = [
    # rows on different single adapters only (the routing of one slot per row, weight 1)
    [Row(PROMPTS[3], ("adapter", "a1"), _greedy()), Row(PROMPTS[3], ("adapter", "a2"), _greedy()),
     Row(PROMPTS[2], ("adapter", "a3"), _greedy(4))],
    # each kind of bad row next to good ones
    [Row(PROMPTS[1], ("base",), _greedy(8)),
     Row(PROMPTS[3], ("adapter", "a1"), _greedy(), bad=("huge", "a2", None)),
     Row(PROMPTS[2], ("blend", (("a1", 0.7), ("a2", -0.5))), _greedy(7)),
     Row(PROMPTS[4], ("adapter", "a3"), _greedy(), bad=("seed",)),
     Row(PROMPTS[5], ("base",), _greedy(), bad=("broken", "a1")),
     Row(PROMPTS[6], ("adapter", "a2"), _greedy(), bad=("hook", "decode", 1)),
     Row(PROMPTS[7], ("adapter", "a1"), _greedy(), bad=("hook", "prefill", 0)),
     Row(PROMPTS[0], ("adapter", "a3"), _greedy(5, seed=1, temperature=1.0), bad=("hook", "sampling", 2))],
    # cancellations (waiting, running, already done), a fault at admission and detokenisation, and a blend
    # needing three slots
    [Row(PROMPTS[3], ("adapter", "a2"), _greedy(8), cancel_after=2),
     Row(PROMPTS[1], ("adapter", "a1"), _greedy(8), cancel_after=0, delay=0.005),
     Row(PROMPTS[2], ("base",), _greedy(2), cancel_after=2),
     Row(PROMPTS[4], ("blend", (("a1", 0.3), ("a2", 0.7), ("a3", -1.0))), _greedy(4)),
     Row(PROMPTS[5], ("adapter", "a3"), _greedy(), bad=("hook", "admission", 0)),
     Row(PROMPTS[6], ("adapter", "a1"), _greedy(), bad=("hook", "detokenize", 3))],
    # long prompts together: in the 4-block cache they grow into their second blocks in the same steps, so rows
    # are preempted mid-decode and resumed, next to a fault, a cancellation, seeded sampling and logprobs
    [Row(PROMPTS[9], ("base",), _greedy(8)),
     Row(PROMPTS[8], ("adapter", "a1"), _greedy(8, seed=2, temperature=1.0, top_k=50)),
     Row(PROMPTS[9], ("blend", (("a1", 0.7), ("a2", -0.5))), _greedy(8), cancel_after=6),
     Row(PROMPTS[8], ("base",), _greedy(8), bad=("hook", "decode", 4)),
     Row(PROMPTS[7], ("adapter", "a2"), _greedy(8)),
     Row(PROMPTS[9], ("base",), _greedy(8, logprobs=2))],
]


@FUZZ_SETTINGS
@given(batch=st.lists(rows(), min_size=1, max_size=8))
@example(batch=EXAMPLES[0])
@example(batch=EXAMPLES[1])
@example(batch=EXAMPLES[2])
@example(batch=EXAMPLES[3])
def test_fuzz_mixed_rows(setup, batch):
    """Random good, bad and cancelled rows together: see the module docstring for the invariants."""
    check_example(setup, batch)


@pytest.mark.parametrize("setup", ["chunk512-2slots-4blocks"], indirect=True)
@FUZZ_SETTINGS
@given(batch=st.lists(rows(prompts=LONG_PROMPTS, random_len=(13, 14)), min_size=3, max_size=8))
def test_fuzz_rows_that_outgrow_the_cache(setup, batch):
    """Random rows of long prompts in the 4-block cache, where rows admitted together outgrow it and are
    preempted: the same invariants."""
    check_example(setup, batch)


@pytest.mark.parametrize("setup", ["chunk512-2slots-4blocks"], indirect=True)
def test_rows_preempted_among_faults_and_cancellations_keep_their_tokens(setup):
    """The long-prompt example in the 4-block cache preempts rows (so the invariants above hold across
    preemption), and afterwards every block is free."""
    before = setup.eng.scheduler.preemptions
    check_example(setup, EXAMPLES[3])
    assert setup.eng.scheduler.preemptions > before
    pool = setup.eng.kv_cache.pool
    pool.check()
    assert pool.in_use == 0
