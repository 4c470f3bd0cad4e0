"""Generation on the real SmolLM2: streaming, batching, chat KV reuse, sampling, stops, int8, bf16."""

from __future__ import annotations

import copy
import functools
import threading

import pytest
import torch

import llama_adapter
import llama_adapter.chat
from llama_adapter import kernels, quantize
from llama_adapter.errors import InputError
from llama_adapter.generate import Sampling, TextStream, sample_next
from llama_adapter.kernels import decode_kernels_available
from llama_adapter.model import AdapterLinear, computing_prompt_tokens
from llama_adapter.prompts import format_alpaca, render
from llama_adapter.quantize import PROMPT_ROWS, Float32Linear, Int4Linear, Int8Linear, PackedLinear, can_pack


def test_stream_yields_pieces_that_join_to_the_answer(smol):
    pieces = list(smol.stream("Name three colours.", max_new_tokens=24))
    assert len(pieces) > 5
    assert "".join(pieces) == smol.generate("Name three colours.", max_new_tokens=24)


def test_sensible_answer(smol):
    answer = smol.generate("Name three colours.", max_new_tokens=48).lower()
    assert sum(c in answer for c in ("red", "blue", "green", "yellow", "orange", "purple", "black", "white")) >= 2


def test_batch_of_four_equals_each_prompt_alone(smol):
    prompts = ["Name three colours.", "What is 2 + 2?", "Write a haiku about the sea and the moon at night.", "Hi"]
    batched = smol.generate_batch(prompts, max_new_tokens=20)
    assert batched == [smol.generate(p, max_new_tokens=20) for p in prompts]


def test_chat_turn_two_prefills_only_new_tokens(smol):
    chat = smol.chat(system="You are terse.")
    first = chat.ask("My name is Ada. Say hello to me.", max_new_tokens=16)
    cached = list(chat.cached_ids)
    second = chat.ask("What is my name?", max_new_tokens=16)
    full = smol.encode(smol.render(chat.messages[:-1]))
    common = next((i for i, (a, b) in enumerate(zip(cached, full)) if a != b), min(len(cached), len(full)))
    new_turn = smol.encode("<|im_start|>user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n")
    assert chat.last_prefill_tokens == len(full) - common
    assert chat.last_prefill_tokens <= len(new_turn) + 3  # the new turn, plus the end of the last answer
    # The cached turn gives the same answer as the whole conversation computed from scratch.
    assert second == smol.generate(chat.messages[:-1], max_new_tokens=16)
    assert first and second


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_chat_cli_answers_as_eager(tiny_pipe, quantize, capsys, caplog):
    """``python -m llama_adapter.chat [--quantize int8] --compile``: the decode step compiled at
    load (no fall-back to eager), the same answer as eager decoding of the same weights."""
    base = tiny_pipe.info["base"]
    eager = llama_adapter.load(base, quantize=quantize) if quantize else tiny_pipe
    expected = eager.chat().ask("Name three colours.", max_new_tokens=60)
    argv = ["--base", base, "--compile", "--prompt", "Name three colours.", "--max-new-tokens", "60"]
    assert llama_adapter.chat.main([*argv, "--quantize", quantize or "none"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert "decoding stays eager" not in caplog.text


def test_compile_that_cannot_happen_keeps_decoding_eager(tiny_pipe, monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor fell over")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    pipe = llama_adapter.load(tiny_pipe.info["base"], compile=True, dtype="fp32")
    assert not pipe.info["compiled"] and "inductor fell over" in caplog.text
    assert pipe.generate("Hi", max_new_tokens=8) == tiny_pipe.generate("Hi", max_new_tokens=8)

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(llama_adapter.build.shutil, "which", lambda name: None)
    assert not llama_adapter.load(tiny_pipe.info["base"], compile=True).info["compiled"]
    assert "needs a C++ compiler" in caplog.text


def test_chat_undo(smol):
    chat = smol.chat()
    chat.ask("Say A.", max_new_tokens=3)
    chat.ask("Say B.", max_new_tokens=3)
    chat.undo()
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Say A."]
    assert chat.messages[-1]["role"] == "assistant"


def test_chat_longer_than_the_context_drops_the_oldest_turns(tiny_pipe):
    chat = tiny_pipe.chat()
    for i in range(6):
        answer = chat.ask(f"Turn {i}: " + "red green blue " * 12, max_new_tokens=8)
        # Dropping turns rewrites the start of the prompt: the cache is cut back to what still matches.
        assert answer == tiny_pipe.generate(chat.messages[:-1], max_new_tokens=8), f"turn {i}"
    assert chat.dropped_turns >= 2
    assert chat.messages[0]["content"].startswith(f"Turn {chat.dropped_turns}:")
    assert chat.cache.length <= tiny_pipe.context_length


# -- exact answers after cache surgery: the KV cache cut back to the shared prefix, positions too ------------


def use_system(chat, system: str) -> None:
    """A new system prompt mid-conversation, as the app's chat tab sets it."""
    chat.messages[:] = [{"role": "system", "content": system}, *(m for m in chat.messages if m["role"] != "system")]


@pytest.mark.parametrize("surgery", ["undo", "retry", "system_prompt_change", "undo_twice_then_ask"])
def test_the_answer_after_cache_surgery_equals_a_fresh_generate(tiny_pipe, surgery):
    """Greedy, on the random tiny model (whose answers move with any change of what it attends to):
    after the cache is cut back to the prefix the new prompt shares, the next answer is exactly
    what generate gives for the same messages from nothing."""
    few = {"max_new_tokens": 12}
    chat = tiny_pipe.chat(system="You are terse.")
    for question in ("Name three colours.", "What shape is this?", "Count to five."):
        chat.ask(question, **few)
    question = "Describe the image."
    if surgery == "undo":
        chat.undo()
    elif surgery == "retry":
        question = chat.messages[-2]["content"]
        chat.undo()
    elif surgery == "system_prompt_change":
        use_system(chat, "Answer in one word.")
    else:
        chat.undo()
        chat.undo()
    cached = chat.cache.length
    answer = chat.ask(question, **few)
    prompt = tiny_pipe.encode(tiny_pipe.render(chat.messages[:-1]))
    reused = len(prompt) - chat.last_prefill_tokens
    assert 0 < reused < cached  # a prefix was reused, and the cache held more than it: surgery happened
    assert answer == tiny_pipe.generate(chat.messages[:-1], **few)


def test_seeded_sampling_is_reproducible(smol):
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50)
    a = smol.generate("Tell me a story.", seed=7, **kw)
    assert a == smol.generate("Tell me a story.", seed=7, **kw)
    assert len({smol.generate("Tell me a story.", seed=s, **kw) for s in range(4)}) > 1


def test_stop_strings_cut_the_answer(smol):
    full = smol.generate("Name three colours.", max_new_tokens=40)
    assert "2." in full
    cut = smol.generate("Name three colours.", max_new_tokens=40, stop=["2."])
    assert "2." not in cut and full.startswith(cut) and len(cut) < len(full)


def test_cancel_stops_streaming(smol):
    cancel = threading.Event()
    pieces = []
    for piece in smol.stream("Write a long essay about rivers.", max_new_tokens=200, cancel=cancel):
        pieces.append(piece)
        cancel.set()
    assert 1 <= len(pieces) <= 3


def test_closing_the_stream_stops_generation(smol):
    stream = smol.stream("Write a long essay about rivers.", max_new_tokens=200)
    next(stream)
    stream.close()  # the client went away: no error, nothing left running


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_k": 1.5}, "top_k"),
        ({"seed": "x"}, "seed"),
        ({"beams": 3}, "Unknown sampling option"),
    ],
)
def test_invalid_sampling_is_a_clear_error(smol, kwargs, message):
    with pytest.raises(InputError, match=message):
        smol.generate("hi", **kwargs)


def test_empty_and_too_long_prompts_are_refused(smol):
    for empty in ("", "   \n\t"):
        with pytest.raises(InputError, match="empty"):
            smol.generate(empty)
    with pytest.raises(InputError, match="reads at most 8,192"):
        smol.generate("lorem ipsum " * 20000)


def test_text_only_model_refuses_an_image_clearly(smol):
    from PIL import Image

    with pytest.raises(InputError, match="no image encoder"):
        smol.generate("What is this?", image=Image.new("RGB", (8, 8)))


def test_text_stream_holds_back_partial_stop_strings(smol):
    tok = smol.tokenizer
    stream = TextStream(tok, ("###",))
    out = "".join(stream.push(t) for t in tok.encode("Hello there ## and ### more", bos=False))
    assert out == "Hello there ## and " and stream.stopped


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each ``decode`` call gets."""

    def __init__(self, tokenizer) -> None:
        self.inner, self.decoded_lengths = tokenizer, []

    def decode(self, ids: list[int]) -> str:
        self.decoded_lengths.append(len(ids))
        return self.inner.decode(ids)


def reference_stream(tokenizer, ids: list[int], stop: tuple[str, ...]) -> str:
    """What a stream must produce, computed the plain way: the whole text, cut at its first stop string."""
    text = tokenizer.decode(ids).rstrip("\ufffd")
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


STREAM_TEXTS = [
    "Hello there ## and ### more",
    "Naïve café: 東京 🌸🌸 and emoji 👩‍💻 end.",
    "A long answer. " * 40,
    "Stop right here END and not after END.",
    "Ends with a partial stop ##",
]


@pytest.mark.parametrize("stop", [(), ("###",), ("END", "###"), ("\n\n",)])
def test_text_stream_pieces_equal_the_whole_decode_and_each_step_decodes_few_ids(smol, tiny_pipe, stop):
    for tokenizer in (smol.tokenizer, tiny_pipe.tokenizer):
        for text in STREAM_TEXTS:
            ids = tokenizer.encode(text, bos=False)
            counting = CountingTokenizer(tokenizer)
            stream = TextStream(counting, stop)
            pieces = []
            for t in ids:
                pieces.append(stream.push(t))
                if stream.stopped:
                    break
            pieces.append(stream.finish())
            assert "".join(pieces) == stream.text == reference_stream(tokenizer, stream.ids, stop)
            # Linear work: no decode call sees more than a handful of ids, however long the answer.
            assert max(counting.decoded_lengths) <= 8, (text, max(counting.decoded_lengths))


def test_alpaca_template_is_the_official_text():
    assert format_alpaca("Describe.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDescribe.\n\n### Response:"
    )
    with_context = render([{"role": "user", "content": "Read it.", "context": "OCR: STOP"}], "alpaca")
    assert "paired with an input" in with_context and "### Input:\nOCR: STOP\n\n### Response:" in with_context


def test_chat_template_marks_expert_context(smol):
    text = smol.render([{"role": "user", "content": "What does the sign say?", "context": "OCR text: EXIT"}])
    assert "[Image context]\nOCR text: EXIT\n[End of image context]\n\nWhat does the sign say?" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_int8_keeps_the_answer_and_the_adapter_precision():
    pipe = llama_adapter.load("smollm2-135m", quantize="int8")
    fp32 = llama_adapter.load("smollm2-135m")
    ids = torch.tensor([fp32.encode(fp32.render("Explain why the sky is blue in two sentences."))])
    with torch.no_grad():
        a, b = pipe.model(ids)[0], fp32.model(ids)[0]
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agreement >= 0.9
    assert pipe.model.layers[0].attention.wqkv.base.weight_int8.dtype == torch.int8
    assert pipe.model.norm.weight.dtype == torch.float32


def test_int4_linear_computes_with_the_group_grid_weights():
    """Each group of 32 inputs of a row is rounded to the nearest of 16 evenly spaced levels from
    its minimum to its maximum; the kernel's packing, its scale/offset layout and its level-8
    offset must reproduce exactly that weight (checked against the grid computed here)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=False)
    groups = linear.weight.detach().reshape(48, 3, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    grid = (low + torch.round((groups - low) / step) * step).reshape(48, 96)
    layer = Int4Linear(linear)
    for shape in ((1, 96), (2, 3, 96)):
        x = torch.randn(shape)
        expected = torch.nn.functional.linear(x.bfloat16().float(), grid)
        torch.testing.assert_close(layer(x), expected, atol=0.03, rtol=0.02)
    for width in ((40, 48), (96, 40)):
        with pytest.raises(ValueError, match="divisible by 32 and output widths by 16"):
            Int4Linear(torch.nn.Linear(*width, bias=False))


@pytest.fixture(scope="module")
def own_kernels():
    if not decode_kernels_available():
        pytest.skip("the decode kernels did not build here (see the log for why)")
    return torch.ops.llama_adapter


def random_int8_product(generator: torch.Generator, outputs: int, width: int):
    weight = torch.randint(-127, 128, (outputs, width), dtype=torch.int8, generator=generator)
    scales = (torch.rand(outputs, generator=generator) / 100).bfloat16()
    return (weight, scales), weight.double() * scales.double()[:, None]


@pytest.mark.parametrize("kind", ["float32", "int8"])
@pytest.mark.parametrize("width", [576, 1536, 40, 7])  # the lanes' tail: 40 = 2×16 + 8, 7 < 16
def test_the_decode_kernels_give_x_times_w_each_row_the_same_alone_or_among_others(own_kernels, kind, width):
    """Against float64 x @ wᵀ (times the row scales for int8) computed here; 194 outputs: 32 tiles
    of 6, enough for two threads, and a tail of 2; one to nine rows (the 4-, 2- and 1-row passes);
    every row bitwise the same in any batch and on one thread or two (the engine's batch invariance
    rests on it)."""
    generator = torch.Generator().manual_seed(width)
    if kind == "float32":
        weight = torch.randn(194, width, generator=generator)
        args, dense = (weight,), weight.double()
        kernel = own_kernels.float_linear
    else:
        args, dense = random_int8_product(generator, 194, width)
        kernel = own_kernels.int8_linear
    x = torch.randn(9, width, generator=generator)
    full = kernel(x, *args)
    expected = x.double() @ dense.T
    torch.testing.assert_close(full.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    for rows in range(1, 9):
        assert torch.equal(kernel(x[:rows].contiguous(), *args), full[:rows])
        assert torch.equal(kernel(x[rows : rows + 1].contiguous(), *args), full[rows : rows + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernel(x, *args), full)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-D float32"):
        kernel(x.double(), *args)
    with pytest.raises(RuntimeError, match="weight must be a contiguous"):
        kernel(x, args[0].T, *args[1:])


def test_the_int8_kernel_refuses_scales_that_do_not_match(own_kernels):
    (weight, scales), _ = random_int8_product(torch.Generator().manual_seed(0), 8, 32)
    x = torch.randn(1, 32)
    for wrong in (scales.float(), scales[:7]):
        with pytest.raises(RuntimeError, match="scales must be a contiguous bfloat16 CPU tensor, one per output row"):
            own_kernels.int8_linear(x, weight, wrong)


@pytest.mark.parametrize("quantize_as", [None, "int8"])
def test_models_decode_through_the_own_kernels_eager_and_compiled(own_kernels, quantize_as):
    """load()'s float32 and int8 models on CPU: every base linear and the head decode through the
    kernels (prompts through F.linear or the bfloat16 copy), eager and inside a compiled graph (the
    C++ wrapper calls the op)."""
    model = llama_adapter.load("tiny", quantize=quantize_as).model
    linears = [m.base for m in model.modules() if isinstance(m, AdapterLinear)] + [model.output]
    layer = linears[0]
    step = torch.randn(1, 2, layer.in_features)
    if quantize_as is None:
        assert all(isinstance(m, Float32Linear) for m in linears)
        plain = torch.nn.Linear(40, 50, bias=False)
        assert Float32Linear(plain).weight is plain.weight  # the same tensor (tied heads stay tied), not a copy
        prompt = torch.randn(1, PROMPT_ROWS, layer.in_features)
        with computing_prompt_tokens():
            assert torch.equal(layer(prompt), torch.nn.functional.linear(prompt, layer.weight))
        expected = own_kernels.float_linear(step[0], layer.weight)
    else:
        assert all(isinstance(m, Int8Linear) and m.own_kernel for m in linears)
        expected = own_kernels.int8_linear(step[0], layer.weight_int8, layer.scales)
    eager = layer(step)
    assert torch.equal(eager, expected[None])
    compiled = torch.compile(layer, fullgraph=True, options={"cpp_wrapper": True})
    assert torch.equal(compiled(step), eager)
    if quantize_as is None:  # a decode step that needs a gradient gets the right one: d(sum W x)/dx = W's column sums
        step.requires_grad_(True)
        layer(step).sum().backward()
        assert torch.allclose(step.grad, layer.weight.sum(0).expand_as(step), atol=1e-5)


def test_without_a_compiler_inference_falls_back_to_torchs_kernels_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    unbuilt = functools.cache(kernels.decode_kernels_available.__wrapped__)
    with caplog.at_level("WARNING", logger="llama_adapter.kernels"):
        assert not unbuilt()
    assert "could not be built" in caplog.text and "no-such-compiler" in caplog.text
    monkeypatch.setattr(quantize, "decode_kernels_available", unbuilt)
    assert isinstance(llama_adapter.load("tiny", quantize=None).model.output, torch.nn.Linear)
    int8 = llama_adapter.load("tiny", quantize="int8").model.output
    assert not int8.own_kernel
    x = torch.randn(3, int8.in_features)
    assert torch.equal(int8(x), torch._weight_int8pack_mm(x.bfloat16(), int8.weight_int8, int8.scales).float())


def test_int8_prompt_tokens_use_the_bfloat16_copy_and_decode_steps_the_int8_kernel():
    """A decode step's rows go through the int8 kernel bit for bit, however many; prompt tokens
    (inside ``computing_prompt_tokens``) from PROMPT_ROWS rows on through the packed bfloat16 copy,
    whose product must be that of the dequantized weight (row scale × integer, computed here)."""
    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this CPU has no native bfloat16 in oneDNN")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    plain, copied = Int8Linear(linear), Int8Linear(linear, prompt_copy=True)
    weight = linear.weight.detach()
    scales = weight.abs().amax(dim=1) / 127
    dequantized = torch.round(weight / scales[:, None]) * scales.bfloat16().float()[:, None]
    for rows in (1, 8, 16, 32):
        x = torch.randn(rows, 64)
        assert torch.equal(copied(x), plain(x))
    with computing_prompt_tokens():
        x = torch.randn(PROMPT_ROWS - 1, 64)
        assert torch.equal(copied(x), plain(x))
        for shape in ((PROMPT_ROWS, 64), (1, 32, 64)):
            x = torch.randn(shape)
            expected = torch.nn.functional.linear(x.bfloat16().float(), dequantized)
            torch.testing.assert_close(copied(x), expected, atol=0.03, rtol=0.02)
            assert not torch.equal(copied(x), plain(x))  # a different kernel computed it


def test_a_prompt_goes_through_the_int8_copy_and_a_decode_step_does_not():
    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this CPU has no native bfloat16 in oneDNN")
    pipe = llama_adapter.load("smollm2-135m", quantize="int8")
    model = pipe.model
    copies = {m: m.prompt_linear for m in model.modules() if isinstance(m, Int8Linear)}
    assert all(linear is not None for linear in copies.values())
    # Four rows: a decode step of four rows is wide enough for the copy, were it used there.
    ids = torch.tensor([pipe.encode(pipe.render("Explain why the sky is blue in two sentences."))] * 4)

    def use_copies(on: bool) -> None:
        for m, linear in copies.items():
            m.prompt_linear = linear if on else None

    def prefill():
        cache = model.new_cache(4)
        model(ids, cache=cache, last_only=True)
        return cache

    with torch.inference_mode():
        use_copies(True)
        cache = prefill()
        use_copies(False)
        assert not torch.equal(cache.keys[-1], prefill().keys[-1])  # the prompt's keys came from the copy
        steps = []
        for on in (True, False):
            use_copies(on)
            steps.append(model(ids[:, -1:], cache=copy.deepcopy(cache)))
        assert torch.equal(*steps)  # the decode step ran on the int8 kernel either way


def test_only_a_small_int8_model_gets_the_prompt_copy(monkeypatch, caplog):
    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this CPU has no native bfloat16 in oneDNN")
    caplog.set_level("INFO")
    small = llama_adapter.load("smollm2-135m", quantize="int8")
    assert small.model.output.prompt_linear is not None and "bfloat16 copy of the weights (+" in caplog.text
    monkeypatch.setattr(llama_adapter.build, "PROMPT_COPY_MAX_WEIGHTS", 100_000_000)
    large = llama_adapter.load("smollm2-135m", quantize="int8")
    assert large.model.output.prompt_linear is None and "GB more)" in caplog.text


def test_int4_agrees_with_fp32_on_smollm2(smol, caplog):
    pipe = llama_adapter.load("smollm2-135m", quantize="int4", compile=True)
    assert isinstance(pipe.model.output, Int4Linear) and pipe.info["quantize"] == "int4"
    assert not pipe.info["compiled"] and "Int4Linear decodes eager only" in caplog.text
    ids = torch.tensor([smol.encode(smol.render("Explain why the sky is blue in two sentences."))])
    with torch.no_grad():
        a, b = pipe.model(ids)[0], smol.model(ids)[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.8
    answer = pipe.generate("Name three colours.", max_new_tokens=64).lower()
    assert any(c in answer for c in ("red", "blue", "green", "yellow", "orange", "purple"))


def test_bf16_on_cpu_agrees_with_fp32_and_uses_packed_weights_when_supported(smol):
    pipe = llama_adapter.load("smollm2-135m", dtype="bf16")
    ids = torch.tensor([smol.encode(smol.render("Explain why the sky is blue in two sentences."))])
    with torch.no_grad():
        a, b = pipe.model(ids)[0].float(), smol.model(ids)[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
    packed = isinstance(pipe.model.layers[0].attention.wqkv.base, PackedLinear)
    assert packed == can_pack(torch.device("cpu"), torch.bfloat16)
    assert packed == isinstance(pipe.model.output, PackedLinear)
    answer = pipe.generate("Name three colours.", max_new_tokens=64).lower()
    assert sum(c in answer for c in ("red", "blue", "green", "yellow", "orange", "purple")) >= 2


def test_packed_linear_equals_the_plain_product():
    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this CPU has no native bfloat16 in oneDNN")
    linear = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    packed = PackedLinear(linear.weight)
    for shape in ((1, 64), (1, 1, 64), (3, 5, 64)):
        x = torch.randn(shape).to(torch.bfloat16)
        expected = torch.nn.functional.linear(x.float(), linear.weight.float())
        torch.testing.assert_close(packed(x).float(), expected, atol=0.05, rtol=0.02)


def test_sampling_from_kwargs_accepts_single_stop_string():
    assert Sampling.from_kwargs(stop="###").stop == ("###",)


# -- sampling on hand-made logits: the draws' frequencies against distributions computed by hand -------------

PROBS = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.02, 0.20, 0.08])  # by rank: ids 1, 3, 5, 2, 6, 0, 4
DRAWS = 40_000  # a frequency's standard error is at most 0.0025: the 0.01 tolerance is 4 of them


def frequencies(logits: torch.Tensor, history: list[int] | None = None, **sampling) -> torch.Tensor:
    """How often each id is drawn, over DRAWS rows of the same logits (seeded)."""
    rows = logits.expand(DRAWS, -1)
    seen = torch.tensor([history]).expand(DRAWS, -1) if history else None
    ids = sample_next(rows, Sampling(**sampling), torch.Generator().manual_seed(0), seen)
    return torch.bincount(ids, minlength=len(logits)) / DRAWS


def renormalised(keep: list[int], probs: torch.Tensor = PROBS) -> torch.Tensor:
    kept = torch.zeros_like(probs)
    kept[keep] = probs[keep]
    return kept / kept.sum()


@pytest.mark.parametrize("k, keep", [(1, [1]), (3, [1, 3, 5]), (5, [1, 3, 5, 2, 6])])
def test_top_k_keeps_the_k_most_likely_tokens(k, keep):
    got = frequencies(PROBS.log(), temperature=1.0, top_k=k)
    assert set(got.nonzero().flatten().tolist()) == set(keep)
    torch.testing.assert_close(got, renormalised(keep), atol=0.01, rtol=0)


@pytest.mark.parametrize("p, keep", [(0.25, [1]), (0.5, [1, 3]), (0.6, [1, 3, 5]), (0.8, [1, 3, 5, 2])])
def test_top_p_keeps_the_smallest_set_whose_probability_reaches_p(p, keep):
    got = frequencies(PROBS.log(), temperature=1.0, top_p=p)
    assert set(got.nonzero().flatten().tolist()) == set(keep)
    torch.testing.assert_close(got, renormalised(keep), atol=0.01, rtol=0)


def test_top_p_over_a_large_vocabulary_keeps_the_whole_nucleus():
    """The nucleus is sorted out of a shortlist of the most likely ids that widens until it holds
    top_p of the mass; here the nucleus is ~200 of 5,000 ids, wider than the first shortlist."""
    logits = torch.randn(5_000, generator=torch.Generator().manual_seed(1))
    logits[:300] += 6
    probs = logits.softmax(-1)
    ranked, order = probs.sort(descending=True)  # the oracle: the whole vocabulary sorted
    nucleus = set(order[: int((ranked.cumsum(0) - ranked < 0.9).sum())].tolist())
    drawn = set(sample_next(logits.expand(4_000, -1), Sampling(temperature=1.0, top_p=0.9), torch.Generator()).tolist())
    assert len(nucleus) > 200
    assert drawn <= nucleus and len(drawn) > 0.95 * len(nucleus)


def test_temperature_divides_the_logits():
    expected = PROBS**2 / (PROBS**2).sum()  # temperature 0.5: every logit doubled
    torch.testing.assert_close(frequencies(PROBS.log(), temperature=0.5), expected, atol=0.01, rtol=0)


def test_repetition_penalty_lowers_exactly_the_seen_ids():
    """CTRL's rule: a seen id's logit is divided by the penalty when positive, multiplied when
    negative; ids seen twice are lowered once; unseen ids keep theirs."""
    logits = torch.tensor([2.0, -1.0, 1.5, 0.5, -0.3, 1.0])
    penalised = torch.tensor([1.0, -2.0, 1.5, 0.5, -0.3, 1.0])  # ids 0 and 1 seen, penalty 2
    got = frequencies(logits, history=[0, 1, 1, 0], temperature=1.0, repetition_penalty=2.0)
    torch.testing.assert_close(got, penalised.softmax(-1), atol=0.01, rtol=0)
    # Greedy: the seen best id falls below the unseen second.
    greedy = sample_next(logits[None], Sampling(repetition_penalty=2.0), None, torch.tensor([[0]]))
    assert greedy.tolist() == [2]
