"""The engine: every request decoded together, each answer the same as alone (greedy and seeded),
requests joining and leaving mid-way, prompts prefilled in chunks beside the decode steps, cancel
and a bounded queue; checked against transformers and against each request run alone."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_hf_model
from PIL import Image, ImageDraw

import llama_adapter
from llama_adapter import EngineBusy
from llama_adapter import engine as engine_module
from llama_adapter.engine import Engine, EngineConfig, SlotCache
from llama_adapter.generate import Sampling
from llama_adapter.model import LlamaAdapter

PROMPTS = [
    "Name three colours.",
    "What shape is this?",
    "Describe the image.",
    "The quick brown fox jumps over the lazy dog. What does the fox do?",
    "Count to five.",
    "A red circle sits next to a blue square. What colour is the shape?",
]


def wait_until(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the engine did not get there"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def endless(tiny_pipe):
    """The tiny model's tokenizer without end tokens: answers run to their token limit."""
    return without_end_tokens(tiny_pipe.tokenizer)


def without_end_tokens(tokenizer):
    endless = copy.copy(tokenizer)
    endless.stop_ids = set()
    return endless


@pytest.fixture
def engine(tiny_pipe):
    engines: list[Engine] = []

    def make(tokenizer=None, **config: Any) -> Engine:
        engines.append(Engine(tiny_pipe.model, tokenizer or tiny_pipe.tokenizer, EngineConfig(**config)))
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def transformers_greedy(hf, ids: list[int], n: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids) :].tolist()


def test_requests_joining_mid_way_decode_as_transformers_does_alone(tiny_pipe, engine):
    """Six requests into four slots, each joining while the earlier ones decode (two wait for a
    slot), prompts longer than a prefill chunk: every answer is transformers' greedy answer."""
    hf = random_hf_model("tiny")  # the weights tiny_pipe was loaded from
    eng = engine(max_batch=4, max_waiting=2, prefill_chunk=8)
    params = Sampling(max_new_tokens=24)
    rows = [tiny_pipe.encode(tiny_pipe.render(p)) for p in PROMPTS]
    assert max(len(r) for r in rows) > 3 * 8
    requests = []
    for ids in rows:
        requests.append(eng.submit(ids, params))
        first, joined = requests[0], len(requests)
        wait_until(lambda: first.completion_tokens >= min(2 * joined, 20) or first.done)  # noqa: B023
    answers = ["".join(r) for r in requests]
    eos = tiny_pipe.tokenizer.eos_id
    assert [r.generated for r in requests] == [transformers_greedy(hf, ids, 24, eos) for ids in rows]
    # The text is the tokens' (an incomplete UTF-8 character at the end is held back).
    assert answers == [tiny_pipe.tokenizer.decode(r.generated).rstrip("\ufffd") for r in requests]
    assert eng.running == 0 and eng.active == 0


def prefill_lengths(model, monkeypatch) -> list[int]:
    """The tokens of every prefill forward pass ``model`` takes from now on."""
    lengths: list[int] = []
    real = model.forward

    def forward(input_ids: torch.Tensor, *args: Any, cache=None, **kwargs: Any) -> Any:
        if not isinstance(cache, SlotCache):
            lengths.append(input_ids.shape[1])
        return real(input_ids, *args, cache=cache, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return lengths


def test_prompts_opening_alike_prefill_the_opening_once_and_decode_as_transformers_does(tiny_pipe, engine, monkeypatch):
    """Prompts that open with the same template text: the first prefills its opening on its own
    and the engine keeps it, the next ones prefill only what follows. Every answer is
    transformers' greedy answer to the whole prompt."""
    hf = random_hf_model("tiny")
    eng = engine(max_batch=2)
    prompts = PROMPTS[:3]
    rows = [tiny_pipe.encode(tiny_pipe.render(p)) for p in prompts]
    openings = {tiny_pipe.shared_opening(p, ids) for p, ids in zip(prompts, rows)}
    assert len(openings) == 1
    opening = openings.pop()
    assert 10 < opening < min(len(ids) for ids in rows)
    lengths = prefill_lengths(tiny_pipe.model, monkeypatch)
    answers = []
    for ids in rows:
        request = eng.submit(ids, Sampling(max_new_tokens=16), prefix=opening)
        list(request)
        answers.append(request.generated)
    eos = tiny_pipe.tokenizer.eos_id
    assert answers == [transformers_greedy(hf, ids, 16, eos) for ids in rows]
    assert lengths == [opening, *(len(ids) - opening for ids in rows)]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny_pipe, engine):
    eng = engine(max_batch=4)
    rows = [tiny_pipe.encode(tiny_pipe.render(p)) for p in PROMPTS[:4]]
    params = [Sampling(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=i) for i in range(4)]
    alone = []
    for ids, p in zip(rows, params):
        request = eng.submit(ids, p)
        list(request)
        alone.append(request.generated)
    together = [eng.submit(ids, p) for ids, p in zip(rows, params)]
    for r in together:
        list(r)
    assert [r.generated for r in together] == alone
    assert len({tuple(a) for a in alone}) == 4


def test_a_newcomers_prompt_is_prefilled_beside_the_decoding_without_holding_it_up(
    tiny_pipe, endless, engine, monkeypatch
):
    """The prefill thread computes a newcomer's prompt in chunks, on one OpenMP thread, while the
    engine thread goes on decoding the others, on one thread too: held in the middle of its prompt,
    the newcomer holds nobody up (nobody waits for a slot), and both answers are the ones they get
    alone, the decoding one although its steps changed thread count under it."""
    eng = engine(endless, max_batch=2, prefill_chunk=8)
    long_prompt = tiny_pipe.encode(PROMPTS[3] * 2)
    assert len(long_prompt) > 3 * 8 and len(long_prompt) + 4 <= tiny_pipe.context_length
    alone = answer(eng, long_prompt, 4)
    count = tiny_pipe.encode("Count to five.")
    count_alone = answer(eng, count, 200)
    decoding = eng.submit(count, Sampling(max_new_tokens=200))
    wait_until(lambda: decoding.completion_tokens >= 3)
    chunks: list[tuple[str, int]] = []
    steps: dict[str, list[int]] = {"prefilling": [], "after": []}
    phase = ["before"]
    held, release = threading.Event(), threading.Event()
    real = tiny_pipe.model.forward

    def forward(*args: Any, cache=None, **kwargs: Any) -> Any:
        if not isinstance(cache, SlotCache):  # a chunk of the newcomer's prompt
            chunks.append((threading.current_thread().name, torch.get_num_threads()))
            if len(chunks) == 2:
                held.set()
                assert release.wait(60)
        elif held.is_set() and not release.is_set():
            steps["prefilling"].append(torch.get_num_threads())
        elif phase[0] == "after":
            steps["after"].append(torch.get_num_threads())
        return real(*args, cache=cache, **kwargs)

    monkeypatch.setattr(tiny_pipe.model, "forward", forward)
    newcomer = eng.submit(long_prompt, Sampling(max_new_tokens=4))
    try:
        assert held.wait(60)
        before = decoding.completion_tokens
        wait_until(lambda: decoding.completion_tokens >= before + 5, seconds=60)
    finally:
        release.set()
    list(newcomer)
    phase[0] = "after"
    before = decoding.completion_tokens
    wait_until(lambda: decoding.completion_tokens >= before + 3, seconds=60)
    decoding.close()
    assert newcomer.generated == alone and newcomer.finish_reason == "length"
    assert chunks == [("llama-adapter-prefill", 1)] * -(-len(long_prompt) // 8)
    assert decoding.finish_reason == "cancelled" and decoding.generated == count_alone[: len(decoding.generated)]
    threads = min(2, os.cpu_count() or 1)
    assert steps["prefilling"] and set(steps["prefilling"]) == {1}
    assert steps["after"] and set(steps["after"]) == {threads}
    # The other threads keep their count, and threads started later get the process's default.
    counts: list[int] = []
    later = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert torch.get_num_threads() == counts[0] == min(2, os.cpu_count() or 1)


def test_openmp_threads_sets_the_calling_threads_count_only_and_restores_it():
    """Inside, this thread computes on one thread; another thread, the process default (what
    threads yet to start take) and, after, this thread's own count are untouched."""
    default = torch.get_num_threads()
    seen: dict[str, int] = {}

    def elsewhere() -> None:
        seen["other thread"] = torch.get_num_threads()

    with engine_module.openmp_threads(1):
        seen["inside"] = torch.get_num_threads()
        assert torch.ones(1 << 20).add(1).sum().item() == 2 * (1 << 20)  # a parallel op runs
        other = threading.Thread(target=elsewhere)
        other.start()
        other.join()
    assert seen == {"inside": 1, "other thread": default}
    assert torch.get_num_threads() == default


def test_under_load_a_step_of_few_rows_waits_for_the_prompt_being_prefilled(tiny_pipe, endless, engine, monkeypatch):
    """With requests queued for a slot, a step of fewer rows than half the slots waits for the
    prompt being prefilled (here for as long as it takes: the hold is made long), then goes on;
    every answer is still the one it gets alone."""
    monkeypatch.setattr(engine_module, "PREFILL_HOLD_SECONDS", 60.0)
    eng = engine(endless, max_batch=4)
    prompts = [tiny_pipe.encode(p) for p in PROMPTS[:5]]
    alone = [answer(eng, ids, 200 if i == 0 else 12) for i, ids in enumerate(prompts)]
    first = eng.submit(prompts[0], Sampling(max_new_tokens=200))
    wait_until(lambda: first.completion_tokens >= 2)
    held, release = threading.Event(), threading.Event()
    real = tiny_pipe.model.forward

    def forward(*args: Any, cache=None, **kwargs: Any) -> Any:
        if not isinstance(cache, SlotCache) and not held.is_set():  # the second request's prompt
            held.set()
            assert release.wait(60)
        return real(*args, cache=cache, **kwargs)

    monkeypatch.setattr(tiny_pipe.model, "forward", forward)
    others = [eng.submit(ids, Sampling(max_new_tokens=12)) for ids in prompts[1:]]  # the last waits for a slot
    try:
        assert held.wait(60)
        wait_until(lambda: eng.active == 4)
        before = first.completion_tokens
        time.sleep(0.5)
        assert first.completion_tokens <= before + 1  # a step already under way may end
    finally:
        release.set()
    for r in others:
        list(r)
    first.close()
    assert [r.generated for r in others] == alone[1:]
    assert first.generated == alone[0][: len(first.generated)] and len(first.generated) > before


def test_cancel_frees_the_slot_before_the_next_step(tiny_pipe, endless, engine):
    eng = engine(endless, max_batch=1)
    ids = tiny_pipe.encode("Count to five.")
    first = eng.submit(ids, Sampling(max_new_tokens=200))
    pieces = iter(first)
    next(pieces)
    second = eng.submit(ids, Sampling(max_new_tokens=5))
    assert eng.running == 2 and eng.active == 1  # the second waits for the only slot
    pieces.close()  # the reader went away
    assert first.finish_reason == "cancelled" and first.completion_tokens < 200
    list(second)
    assert second.finish_reason == "length" and second.completion_tokens == 5
    assert eng.running == 0


def test_a_full_queue_refuses_at_once_and_a_cancelled_request_makes_room(tiny_pipe, endless, engine):
    eng = engine(endless, max_batch=1, max_waiting=1)
    ids = tiny_pipe.encode("Count to five.")
    running = eng.submit(ids, Sampling(max_new_tokens=200))
    wait_until(lambda: running.completion_tokens > 0)
    waiting = eng.submit(ids, Sampling(max_new_tokens=5))
    with pytest.raises(EngineBusy, match="busy"):
        eng.submit(ids, Sampling(max_new_tokens=5))
    waiting.close()
    assert waiting.finish_reason == "cancelled" and waiting.completion_tokens == 0
    third = eng.submit(ids, Sampling(max_new_tokens=5))
    running.close()
    assert "".join(third) and third.finish_reason == "length"


def test_stop_strings_and_end_tokens_end_a_request_with_reason_stop(tiny_pipe, engine):
    eng = engine(max_batch=2)
    ids = tiny_pipe.encode(tiny_pipe.render("Name three colours."))
    whole = eng.submit(ids, Sampling(max_new_tokens=40))
    text = "".join(whole)
    assert len(text) > 10
    stop = text[5:8]
    cut = eng.submit(ids, Sampling(max_new_tokens=40, stop=(stop,)))
    assert "".join(cut) == text[: text.index(stop)] and cut.finish_reason == "stop"


def test_each_row_sees_its_own_image():
    """The demo model (paper wiring, a visual prompt in every layer): two images decoded in one
    batch give each the answer it gets alone."""
    from test_image_chat import visual_pipeline

    pipe = visual_pipeline()
    question = "What color is the shape? Answer with one word."
    images = []
    for colour in ("red", "blue", "green"):
        img = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(img).ellipse((16, 16, 80, 80), fill=colour)
        images.append(img)
    alone = [pipe.generate(question, image=img, max_new_tokens=6) for img in images]
    together = pipe.generate_batch([question] * 3, images, max_new_tokens=6)
    assert together == alone
    assert len(set(alone)) > 1, alone  # the rows really saw different images


def test_a_row_left_alone_high_moves_down_and_its_logits_stay_those_it_gets_alone(monkeypatch):
    """Four image questions decode in four rows; when the three below the last leave, its row
    moves down to the first (its keys, values and its own image's prompt keys and values with it)
    and the steps compute the fewest rows, not the four up to it. Every logit it is sampled from
    is bitwise the one it gets alone."""
    from test_image_chat import visual_pipeline

    pipe = visual_pipeline()
    ids = pipe.encode(pipe.render("What color is the shape? Answer with one word."))
    visuals = []
    for colour in ("red", "blue", "green", "yellow"):
        img = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(img).ellipse((16, 16, 80, 80), fill=colour)
        visuals.append(pipe.visual_prompt(img))
    seen: list[torch.Tensor] = []
    real_sample = Engine._sample

    def sample(self: Engine, request, logits: torch.Tensor) -> int:
        if request.params.max_new_tokens == 30:
            seen.append(logits.clone())
        return real_sample(self, request, logits)

    monkeypatch.setattr(Engine, "_sample", sample)
    engine = Engine(pipe.model, without_end_tokens(pipe.tokenizer), EngineConfig(max_batch=4))
    try:
        list(engine.submit(ids, Sampling(max_new_tokens=30), visual_prompt=visuals[3]))
        alone, seen = seen, []
        others = [engine.submit(ids, Sampling(max_new_tokens=200), visual_prompt=v) for v in visuals[:3]]
        last = engine.submit(ids, Sampling(max_new_tokens=30), visual_prompt=visuals[3])
        wait_until(lambda: last.completion_tokens >= 2)
        assert last.slot == 3 and all(r.decoding for r in others)
        rows = step_rows(pipe.model, monkeypatch)
        for r in others:
            r.close()
        list(last)
    finally:
        engine.close()
    assert last.slot == 0 and rows[0] == 4 and rows[-1] == engine.row_counts[0] < 4
    assert len(seen) == len(alone) == 30
    differing = [i for i, (a, b) in enumerate(zip(alone, seen)) if not torch.equal(a, b)]
    assert not differing, f"the logits differ from token {differing[0]}"


def test_a_kept_opening_gives_the_logits_computed_anew_and_only_to_prompts_with_its_image(monkeypatch):
    """The demo model's visual prompt enters every layer, so an opening's keys and values depend on
    the image: a question about a red circle, asked again, reuses its opening and is sampled from
    bitwise the logits of the first time; about a blue circle, the opening is computed anew."""
    from test_image_chat import visual_pipeline

    pipe = visual_pipeline()
    question = "What color is the shape? Answer with one word."
    ids = pipe.encode(pipe.render(question))
    opening = pipe.shared_opening(question, ids)
    assert 0 < opening < len(ids)
    red, blue = (Image.new("RGB", (96, 96), "white") for _ in range(2))
    for img, colour in ((red, "red"), (blue, "blue")):
        ImageDraw.Draw(img).ellipse((16, 16, 80, 80), fill=colour)
    seen: list[list[torch.Tensor]] = []
    real_sample = Engine._sample

    def sample(self: Engine, request, logits: torch.Tensor) -> int:
        if not request.generated:
            seen.append([])
        seen[-1].append(logits.clone())
        return real_sample(self, request, logits)

    monkeypatch.setattr(Engine, "_sample", sample)
    engine = Engine(pipe.model, without_end_tokens(pipe.tokenizer), EngineConfig(max_batch=2))
    lengths = prefill_lengths(pipe.model, monkeypatch)
    try:
        for img in (red, red, blue, red):
            list(engine.submit(ids, Sampling(max_new_tokens=8), visual_prompt=pipe.visual_prompt(img), prefix=opening))
    finally:
        engine.close()
    rest = len(ids) - opening
    assert lengths == [opening, rest, rest, opening, rest, rest]
    first_red, red_again, first_blue, red_last = seen
    for again in (red_again, red_last):
        assert all(torch.equal(a, b) for a, b in zip(first_red, again, strict=True))
    assert not torch.equal(first_red[0], first_blue[0])


@pytest.fixture(scope="module")
def smol_default():
    """SmolLM2 as load() gives it by default on CPU: weight-only int8."""
    pipe = llama_adapter.load("smollm2-135m")
    assert pipe.info["quantize"] == "int8"
    return pipe


@pytest.mark.parametrize("precision", ["fp32", "default (int8)"])
def test_eight_concurrent_greedy_answers_of_the_real_model_equal_their_solo_answers(precision, smol, smol_default):
    """Solo answers decode at the smallest row count, concurrent ones (joining at different
    times) at larger ones: each answer is the same."""
    smol = smol if precision == "fp32" else smol_default
    prompts = [
        "Name three colours.",
        "What is 2 + 2?",
        "Write a haiku about the sea.",
        "Hi",
        "Explain why the sky is blue.",
        "Give me three tips for learning a new language.",
        "What is the capital of France?",
        "Write one sentence about rivers.",
    ]
    solo = [smol.generate(p, max_new_tokens=48) for p in prompts]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = smol.generate(prompts[i], max_new_tokens=48)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [answers[i] for i in range(len(prompts))] == solo
    assert smol.generate_batch(prompts, max_new_tokens=48) == solo


@pytest.mark.parametrize("precision", ["fp32", "default (int8)"])
def test_every_logit_of_a_request_is_bitwise_the_same_alone_and_among_seven_others(
    precision, smol, smol_default, monkeypatch
):
    """Greedy answers rarely change on a last-bit difference, so this compares the logits each
    token is drawn from: 8 requests of different lengths, decoded alone and together (their rows,
    row counts and the cache's capacity differ; the capacity grows past 64 and 128 positions).
    SDPA's CPU attention failed this on two threads (logits off by up to 0.25 by the 19th token)."""
    pipe = smol if precision == "fp32" else smol_default
    prompts = [f"Write {n} sentences about {topic}." for n, topic in zip(range(1, 9), "abcdefgh")]
    rows = [pipe.encode(pipe.render(p)) + [pipe.tokenizer.encode(" x")[0]] * (7 * i) for i, p in enumerate(prompts)]
    seen: dict[int, list[torch.Tensor]] = {}
    real_sample = Engine._sample

    def sample(self: Engine, request, logits: torch.Tensor) -> int:
        seen.setdefault(len(request.ids), []).append(logits.clone())
        return real_sample(self, request, logits)

    monkeypatch.setattr(Engine, "_sample", sample)
    engine = Engine(pipe.model, without_end_tokens(pipe.tokenizer), EngineConfig(max_batch=8))
    params = Sampling(max_new_tokens=48)
    try:
        for ids in rows:
            list(engine.submit(ids, params))
        alone, seen = seen, {}
        requests = [engine.submit(ids, params) for ids in rows]
        for r in requests:
            list(r)
    finally:
        engine.close()
    assert sorted(alone) == sorted(seen) == sorted(len(ids) for ids in rows)
    assert max(alone) + 48 > 128
    for length, logits in alone.items():
        assert len(seen[length]) == len(logits) == 48
        differing = [i for i, (a, b) in enumerate(zip(logits, seen[length])) if not torch.equal(a, b)]
        assert not differing, f"the {length}-token prompt's logits differ from token {differing[0]}"


def step_rows(model, monkeypatch) -> list[int]:
    """The number of rows of every decode step ``model`` takes from now on."""
    rows: list[int] = []
    real = model.forward

    def forward(*args: Any, cache=None, **kwargs: Any) -> Any:
        if isinstance(cache, SlotCache):
            rows.append(cache.shape[0])
        return real(*args, cache=cache, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return rows


def test_a_lone_request_decodes_only_the_rows_it_needs_and_answers_as_a_full_batch_does(
    tiny_pipe, endless, engine, monkeypatch
):
    eng = engine(endless, max_batch=4)
    assert eng.row_counts[-1] == 4 and list(eng.row_counts) == sorted(set(eng.row_counts))
    ids = tiny_pipe.encode(tiny_pipe.render(PROMPTS[0]))
    rows = step_rows(tiny_pipe.model, monkeypatch)
    lone = answer(eng, ids, 24)
    fewest = eng.row_counts[0]
    assert set(rows) == {fewest}
    eng.row_counts = (4,)  # every step computes all four rows, as before row counts
    assert answer(eng, ids, 24) == lone
    assert set(rows) == {fewest, 4}


def test_a_row_count_whose_rows_differ_from_a_full_step_is_not_used(tiny_pipe, endless, engine, monkeypatch):
    """Steps of two rows perturbed in the last bits (as a kernel blocked another way would):
    the engine's probe finds it, and two requests then decode four rows."""
    real = tiny_pipe.model.forward

    def forward(*args: Any, cache=None, **kwargs: Any) -> Any:
        logits = real(*args, cache=cache, **kwargs)
        if isinstance(cache, SlotCache) and cache.shape[0] == 2:
            logits = logits.clone()
            logits[0, 0, 0] += 1e-6 * logits[0, 0, 0].abs().clamp(min=1)
        return logits

    monkeypatch.setattr(tiny_pipe.model, "forward", forward)
    eng = engine(endless, max_batch=4)
    assert 2 not in eng.row_counts and 4 in eng.row_counts
    monkeypatch.setattr(tiny_pipe.model, "forward", real)
    rows = step_rows(tiny_pipe.model, monkeypatch)
    ids = tiny_pipe.encode(tiny_pipe.render(PROMPTS[0]))
    first, second = eng.submit(ids, Sampling(max_new_tokens=12)), eng.submit(ids, Sampling(max_new_tokens=12))
    list(first), list(second)
    assert 2 not in rows and 4 in rows
    assert first.generated == second.generated


@pytest.mark.parametrize("slots", [1, 2])
def test_the_cache_shrinks_back_when_a_long_request_leaves(tiny_pipe, endless, engine, slots):
    eng = engine(endless, max_batch=slots)
    short = tiny_pipe.encode("Count to five.")
    before = eng.submit(short, Sampling(max_new_tokens=20))
    list(before)
    long_prompt = tiny_pipe.encode(PROMPTS[3])
    long = eng.submit(long_prompt, Sampling(max_new_tokens=tiny_pipe.context_length - len(long_prompt) - 8))
    wait_until(lambda: long.completion_tokens > 150)
    grown = eng.slots.capacity
    long.close()
    after = eng.submit(short, Sampling(max_new_tokens=20))
    list(after)
    assert grown >= 200 and eng.slots.capacity <= 64
    assert after.generated == before.generated
    # Shrunk buffers have a fresh tensor's strides: a compiled step guards on them (one row kept the
    # wide row's stride once, and the step recompiled mid-answer).
    buffers = [eng.slots.key_valid, *eng.slots.keys, *eng.slots.values]
    assert all(t.stride() == torch.empty(t.shape).stride() for t in buffers)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2, reason="Linux, 2+ threads")
def test_threads_give_their_openmp_workers_back_to_the_engine(tiny_pipe, endless, engine):
    """OpenMP keeps worker threads for each thread that ran a parallel torch op; more of them than
    cores and the engine thread's hundreds of small parallel regions each wait to wake their
    workers (decoding ran at half speed). A caller (a Gradio or API handler that encoded an image)
    lets its workers go when it submits, and the engine lets its own go when it falls idle."""

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    eng = engine(endless, max_batch=2)
    ids = tiny_pipe.encode("Count to five.")
    idle = threads()
    counts, answered, leave = {}, threading.Event(), threading.Event()

    def handler() -> None:  # stays alive: a thread's workers also end with it
        torch.ones(1 << 22).add(1)  # a parallel op: this thread now has workers
        counts["with workers"] = threads()
        answer(eng, ids, 4)
        answered.set()
        leave.wait()

    caller = threading.Thread(target=handler)
    caller.start()
    try:
        assert answered.wait(60)
        assert counts["with workers"] == idle + 1 + torch.get_num_threads() - 1  # the caller, its workers
        wait_until(lambda: threads() == idle + 1, seconds=10)  # the caller alone
    finally:
        leave.set()
        caller.join()


def answer(engine: Engine, ids: list[int], n: int = 16) -> list[int]:
    request = engine.submit(ids, Sampling(max_new_tokens=n))
    list(request)
    return request.generated


def test_compiling_in_the_background_answers_eager_meanwhile_and_switches_between_answers(fresh_compiler):
    """The engine keeps answering (eager) while its decode step compiles in another thread; an
    answer under way when the compiled step is ready finishes eager; then the engine switches,
    decodes with the compiled graph (no further compile) and gives the same greedy answers."""
    from torch._dynamo.utils import counters

    pipe = llama_adapter.load("tiny")  # its own model: the switch replaces the model's decode step
    tokenizer = copy.copy(pipe.tokenizer)
    tokenizer.stop_ids = set()
    eng = Engine(pipe.model, tokenizer, EngineConfig(max_batch=2, prefill_chunk=8))
    try:
        ids = pipe.encode(pipe.render(PROMPTS[0]))
        eager = answer(eng, ids)
        held, original, steps = threading.Event(), eng._decode_step, []

        def step() -> None:  # held until the compile is done; then notes which step decoded
            held.wait()
            steps.append((under_way.done, "decode_step" in vars(pipe.model)))
            original()

        eng._decode_step = step
        under_way = eng.submit(ids, Sampling(max_new_tokens=16))
        compiling = eng.compile_in_background()
        assert eng.compile_state == "compiling"
        compiling.join()
        assert eng.compile_state == "compiling" and "decode_step" not in vars(pipe.model), "switched mid-answer"
        held.set()
        list(under_way)
        assert under_way.generated == eager
        assert not any(compiled for done, compiled in steps if not done), "switched mid-answer"
        wait_until(lambda: eng.compile_state == "compiled")
        assert "decode_step" in vars(pipe.model)
        graphs = counters["stats"]["unique_graphs"]
        assert answer(eng, ids) == eager and answer(eng, ids[:5]) == answer(eng, ids[:5])
        chunk = eng.config.prefill_chunk
        assert len(ids) > chunk + 1
        answer(eng, ids[: chunk + 1])  # its last prefill chunk is one token: a prompt's, not a decode step
        assert counters["stats"]["unique_graphs"] == graphs, "compiled while serving"
    finally:
        eng.close()


def test_under_a_steady_load_the_compiled_step_takes_over_once_the_answers_under_way_are_done(
    tiny_pipe, endless, engine, monkeypatch
):
    """A compiled step that is ready while answers are being written waits for them (newcomers
    wait too, or the slots would never all be free), then decodes everything after."""
    eng = engine(endless, max_batch=2)
    ids = tiny_pipe.encode("Count to five.")
    running = eng.submit(ids, Sampling(max_new_tokens=tiny_pipe.context_length - len(ids)))
    wait_until(lambda: running.completion_tokens > 2)
    steps: list[int] = []
    eager = tiny_pipe.model.decode_step

    def compiled(h, freqs, cache):  # stands in for the compiled graph: the same logits, counted
        steps.append(h.shape[0])
        return eager(h, freqs, cache)

    monkeypatch.setattr(tiny_pipe.model, "decode_step", eager)  # restored after the test
    with eng._cond:
        eng._compiled = (compiled, eng.row_counts)
        eng._cond.notify()
    newcomer = eng.submit(ids, Sampling(max_new_tokens=8))
    time.sleep(0.2)
    assert newcomer.completion_tokens == 0 and not running.done and not steps
    running.cancel()
    list(newcomer)
    assert newcomer.finish_reason == "length" and steps and eng.compile_state == "compiled"


def test_inductor_traces_nothing_in_the_compile_thread_that_breaks_other_threads():
    """Inductor's first lowering in a process runs a ``torch.fx`` symbolic trace, which patches
    ``nn.Module.__call__`` for every thread: a model called in another thread meanwhile fails. So
    no such trace may run in the background compile thread, even on a cold cache (a fresh process
    with inductor's caches off: 40 s)."""
    script = textwrap.dedent("""
        import threading, time, torch, torch.fx
        import llama_adapter
        from llama_adapter.engine import Engine, EngineConfig
        traced_in = []
        trace = torch.fx.Tracer.trace
        def recording_trace(self, *args, **kwargs):
            if type(self).call_module is torch.fx.Tracer.call_module:  # refuses modules it is not tracing
                traced_in.append(threading.current_thread().name)
            return trace(self, *args, **kwargs)
        torch.fx.Tracer.trace = recording_trace
        pipe = llama_adapter.load("tiny")
        engine = Engine(pipe.model, pipe.tokenizer, EngineConfig(max_batch=2))
        engine.compile_in_background().join()
        deadline = time.monotonic() + 60  # the engine thread switches to the compiled step when it wakes
        while engine.compile_state == "compiling" and time.monotonic() < deadline:
            time.sleep(0.01)
        print(engine.compile_state, traced_in)
    """)
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    state, traced_in = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert state == "compiled", done.stderr[-2000:]
    assert "llama-adapter-compile" not in traced_in and "MainThread" in traced_in


def test_a_failed_background_compile_warns_and_stays_eager(tiny_pipe, endless, engine, monkeypatch, caplog):
    def broken(model, warm_up=True):
        raise RuntimeError("inductor fell over")

    eng = engine(endless, max_batch=2)
    ids = tiny_pipe.encode(tiny_pipe.render(PROMPTS[1]))
    eager = answer(eng, ids)
    monkeypatch.setattr(LlamaAdapter, "compile_decoding", broken)
    eng.compile_in_background().join()
    assert eng.compile_state == "eager" and "inductor fell over" in caplog.text
    assert "decode_step" not in vars(tiny_pipe.model) and answer(eng, ids) == eager
