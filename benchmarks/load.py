"""Load test: N users against the app for D seconds: gradio_client users mixing streamed chat and
image questions with and without OCR, and OpenAI-client users streaming chat and image questions
from ``/v1/chat/completions`` on the same port. Reports requests, failures, queue-full refusals
(handled: the user is told to try again), p50/p95 latency, throughput (answer tokens per second
over all users), and the server's resident memory at start and end.

    python -m benchmarks.load                                    # starts `python app.py` on 127.0.0.1
    python -m benchmarks.load --url http://127.0.0.1:7860/ --pid 1234 --users 20 --api-users 10 --seconds 120
    python -m benchmarks.load -- --max-batch 1                   # the one-answer-at-a-time server

Tokens: the API reports them (``usage``); a Gradio answer's are counted with the tokenizer of
``--tokenizer`` (default SmolLM2's, the demo model's base).

The measured window follows a warm-up: one request of each kind and every image through OCR once
(models load on first use; OCR text is cached per image), then the same load as the window for
``--warmup`` seconds (default 30; its requests are counted apart, its failures too), while the
allocator's memory settles. Start memory is taken at the end of the warm-up, so growth measures
what the load leaves behind. Exit status 1 when a request failed or
memory grew by more than ``--max-growth`` percent.
"""

from __future__ import annotations

import os

APP_ENVIRONMENT = dict(os.environ)
"""The app runs in the caller's environment, as ``python app.py`` would, not in this process's."""
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads sleep on a shared CPU

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

log = logging.getLogger("benchmarks.load")

ROOT = Path(__file__).resolve().parent.parent
GRADIO_KINDS = ("chat", "image", "image+ocr")
API_KINDS = ("api-chat", "api-image")
KINDS = (*GRADIO_KINDS, *API_KINDS)
SAMPLE_EVERY = 10.0
CHAT_PROMPTS = [
    "Name three colours.",
    "Write one sentence about the sea.",
    "What is 2 + 3?",
    "Give me a word that rhymes with cat.",
    "Say hello in French.",
]


@dataclass
class Result:
    kind: str
    seconds: float
    outcome: str  # "ok", "queue_full" (handled: the user was told to try again) or "failed"
    error: str = ""
    tokens: int = 0  # of the answer


@dataclass
class Report:
    users: int
    seconds: float
    results: list[Result] = field(default_factory=list)
    """Requests started in the measured window."""
    warmup: list[Result] = field(default_factory=list)
    rss_start: int | None = None
    rss_end: int | None = None
    rss_samples: list[int] = field(default_factory=list)
    """Every ``SAMPLE_EVERY`` seconds: whether memory levels off or keeps climbing."""

    def count(self, outcome: str, kind: str | None = None) -> int:
        return sum(r.outcome == outcome and kind in (None, r.kind) for r in self.results)

    @property
    def failed(self) -> int:
        """Failed requests, the warm-up's included."""
        return self.count("failed") + sum(r.outcome == "failed" for r in self.warmup)

    @property
    def queue_full(self) -> int:
        return self.count("queue_full")

    @property
    def growth(self) -> float | None:
        """Resident memory growth in percent, start to end."""
        if not self.rss_start or self.rss_end is None:
            return None
        return 100.0 * (self.rss_end - self.rss_start) / self.rss_start

    def latencies(self, kind: str | None = None) -> list[float]:
        return sorted(r.seconds for r in self.results if r.outcome == "ok" and kind in (None, r.kind))

    def throughput(self, kind: str | None = None) -> float:
        """Answer tokens per second of the window, over all users (or those of ``kind``)."""
        return sum(r.tokens for r in self.results if r.outcome == "ok" and kind in (None, r.kind)) / self.seconds

    def table(self) -> str:
        def pct(values: list[float], q: float) -> str:
            return f"{values[min(len(values) - 1, int(q * len(values)))]:.1f}" if values else "-"

        lines = [
            f"{self.users} users for {self.seconds:.0f} s: {len(self.results)} requests, "
            f"{self.count('ok')} ok, {self.queue_full} queue-full (handled), {self.count('failed')} failed",
            "",
            f"{'kind':<10} {'requests':>8} {'ok':>5} {'queue-full':>10} {'failed':>6} "
            f"{'p50 s':>7} {'p95 s':>7} {'max s':>7} {'tokens/s':>9}",
        ]
        for kind in (*KINDS, None):
            rows = [r for r in self.results if kind in (None, r.kind)]
            lat = self.latencies(kind)
            lines.append(
                f"{kind or 'all':<10} {len(rows):>8} {self.count('ok', kind):>5} {self.count('queue_full', kind):>10} "
                f"{self.count('failed', kind):>6} {pct(lat, 0.5):>7} {pct(lat, 0.95):>7} "
                f"{(f'{lat[-1]:.1f}' if lat else '-'):>7} {self.throughput(kind):>9.1f}"
            )
        if self.rss_start is not None and self.rss_end is not None:
            lines += [
                "",
                f"server resident memory: {self.rss_start / 2**20:,.0f} MiB at start, {self.rss_end / 2**20:,.0f} MiB "
                f"at end ({self.growth:+.1f} %)",
                "  over time (MiB): " + " ".join(f"{m / 2**20:.0f}" for m in self.rss_samples),
            ]
        warm_failed = sum(r.outcome == "failed" for r in self.warmup)
        lines.append(f"warm-up before the window: {len(self.warmup)} requests, {warm_failed} failed")
        errors = sorted({r.error for r in self.results + self.warmup if r.outcome == "failed"})
        lines += [f"failure: {e}" for e in errors[:10]]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        lat = self.latencies()
        return {
            "users": self.users,
            "seconds": self.seconds,
            "requests": len(self.results),
            "ok": self.count("ok"),
            "queue_full": self.queue_full,
            "failed": self.failed,
            "p50_s": statistics.median(lat) if lat else None,
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
            "tokens_per_s": self.throughput(),
            "rss_start": self.rss_start,
            "rss_end": self.rss_end,
            "rss_growth_percent": self.growth,
            "warmup_requests": len(self.warmup),
            "results": [asdict(r) for r in self.results],
        }


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None


def example_images(directory: Path | None = None) -> list[Path]:
    """The app's example images (assets/examples, else the demo data's), else two drawn here."""
    candidates = [directory] if directory else [ROOT / "assets" / "examples", ROOT / "data" / "demo" / "examples"]
    for folder in candidates:
        index = folder / "examples.json"
        if index.is_file():
            found = [folder / item["image"] for item in json.loads(index.read_text())]
            found = [p for p in found if p.is_file()]
            if found:
                return found
    from PIL import Image, ImageDraw

    folder = Path(tempfile.mkdtemp(prefix="load-images-"))
    sign = Image.new("RGB", (480, 160), "white")
    ImageDraw.Draw(sign).text((30, 60), "OPEN 24 HOURS", fill="black")
    sign.save(folder / "sign.png")
    shape = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(shape).ellipse((24, 24, 104, 104), fill="red")
    shape.save(folder / "circle.png")
    return [folder / "sign.png", folder / "circle.png"]


def _classify(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    full = "queue is full" in text.lower() or getattr(error, "status_code", None) == 503
    return "queue_full" if full else "failed"


def request(client: Any, kind: str, rng: random.Random, images: list[Path], max_new_tokens: int, count: Any) -> int:
    """One request of ``kind``, a prompt or image drawn with ``rng``; raises unless it was answered.
    Returns the answer's tokens (``count(text)`` for a Gradio answer)."""
    if kind in API_KINDS:
        return api_request(client, kind, rng, images, max_new_tokens)
    from gradio_client import handle_file

    if kind == "chat":
        return count(client.predict(rng.choice(CHAT_PROMPTS), [], max_new_tokens=max_new_tokens, api_name="/chat"))
    experts = ["ocr"] if kind == "image+ocr" else []
    question = "What does the image show?" if not experts else "What does the text say?"
    image = handle_file(str(rng.choice(images)))
    result = client.predict(image, question, experts, max_new_tokens=max_new_tokens, api_name="/describe_image")
    if not isinstance(result, dict) or not isinstance(result.get("answer"), str):
        raise RuntimeError(f"unexpected /describe_image result: {str(result)[:200]}")
    return count(result["answer"])


def api_request(client: Any, kind: str, rng: random.Random, images: list[Path], max_new_tokens: int) -> int:
    """A streamed ``/v1/chat/completions`` request through the ``openai`` client."""
    import base64

    content: Any = rng.choice(CHAT_PROMPTS)
    if kind == "api-image":
        encoded = base64.b64encode(rng.choice(images).read_bytes()).decode()
        content = [
            {"type": "text", "text": "What does the image show?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
        ]
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_new_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    if usage is None:
        raise RuntimeError("the stream ended without usage")
    return usage.completion_tokens


def token_counter(tokenizer_dir: Path | None) -> Any:
    """Counts a Gradio answer's tokens with the model's tokenizer (``None``: SmolLM2's)."""
    from llama_adapter.tokenizer import load_tokenizer
    from llama_adapter.weights import smollm2_dir

    tokenizer = load_tokenizer(tokenizer_dir or smollm2_dir())
    return lambda text: len(tokenizer.encode(text, bos=False))


def run_load(
    url: str,
    *,
    users: int = 20,
    seconds: float = 120.0,
    warmup: float = 30.0,
    images: list[Path] | None = None,
    pid: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 24,
    mix: tuple[float, float, float] = (0.5, 0.25, 0.25),
    api_users: int = 0,
    api_mix: tuple[float, float] = (0.5, 0.5),
    tokenizer: Path | None = None,
    requests: int | None = None,
) -> Report:
    """``users`` users, each asking one question after another (the first ``api_users`` through
    the OpenAI client, streaming, the others through gradio_client): for ``warmup`` seconds
    (counted apart: memory settles as every worker thread and input size is first seen), then for
    ``seconds``, the measured window. Requests still running at the end are waited for.
    With ``requests`` each user instead asks exactly that many (a refusal counts as one), all
    measured: the same work on a fast machine and a slow one (the test suite's way)."""
    from gradio_client import Client

    images = images or example_images()
    report = Report(users, seconds)
    count = token_counter(tokenizer)

    # gradio_client opens a new httpx client, and so builds a TLS context from the CA bundle (~20 ms
    # of CPU), for every call, even to http://; on a machine the load generator shares with the server
    # that CPU is taken from the server. One context, made here, serves every call (httpx takes an
    # SSLContext wherever gradio_client passes ``ssl_verify``).
    tls = ssl.create_default_context()

    def connect(api: bool) -> Any:
        if api:
            import openai

            return openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=600)
        return Client(url, verbose=False, ssl_verify=tls)

    first = connect(False)
    # Models load on first use, and OCR runs once per image (then its text is cached): both are done
    # here, untimed, so that the window measures the steady state.
    for kind, weight in zip(GRADIO_KINDS, mix):
        for image in images if kind == "image+ocr" else images[:1]:
            if weight:
                request(first, kind, random.Random(seed), [image], max_new_tokens, count)
    if api_users:
        for kind in API_KINDS:
            request(connect(True), kind, random.Random(seed), images[:1], max_new_tokens, count)
    lock = threading.Lock()
    measured_from = time.monotonic() + (warmup if requests is None else 0.0)
    deadline = measured_from + seconds

    def more(asked: int) -> bool:
        return asked < requests if requests is not None else time.monotonic() < deadline

    def user(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        api = index < api_users
        client = connect(api)
        asked = 0
        while more(asked):
            asked += 1
            kind = rng.choices(API_KINDS, weights=api_mix)[0] if api else rng.choices(GRADIO_KINDS, weights=mix)[0]
            started = time.monotonic()
            try:
                tokens = request(client, kind, rng, images, max_new_tokens, count)
                result = Result(kind, time.monotonic() - started, "ok", tokens=tokens)
            except Exception as e:  # every failure is a result to report, not a crash of the load test
                result = Result(kind, time.monotonic() - started, _classify(e), f"{type(e).__name__}: {e}"[:300])
            with lock:
                (report.results if started >= measured_from else report.warmup).append(result)
            if result.outcome == "queue_full":
                time.sleep(rng.uniform(0.5, 1.5))  # as a person would, before trying again

    threads = [threading.Thread(target=user, args=(i,), name=f"user-{i}", daemon=True) for i in range(users)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # users arrive over a second, not in one burst
    time.sleep(max(0.0, measured_from - time.monotonic()))
    if pid:
        report.rss_start = rss(pid)
    while any(t.is_alive() for t in threads):
        if pid:
            report.rss_samples.append(rss(pid))
        until = time.monotonic() + SAMPLE_EVERY
        while time.monotonic() < until and any(t.is_alive() for t in threads):
            time.sleep(0.2)
    if pid:
        report.rss_end = rss(pid)
    if requests is not None:
        report.seconds = time.monotonic() - measured_from
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, extra: list[str], logfile: Path) -> subprocess.Popen:
    """``python app.py`` on 127.0.0.1:``port``, offline; returns once it answers."""
    import httpx

    env = {
        **APP_ENVIRONMENT,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_SERVER_NAME": "127.0.0.1",
    }
    with open(logfile, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), *extra],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{logfile.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"app.py did not answer within 300 s; see {logfile}")


@dataclass
class Server:
    url: str
    pid: int | None


@contextmanager
def served(args: argparse.Namespace, workdir: Path) -> Iterator[Server]:
    """The app to load: the one at ``--url``, or ``python app.py`` started (and stopped) here."""
    if args.url:
        yield Server(args.url, args.pid)
        return
    extra = list(args.app_args)
    port = free_port()
    proc = start_app(port, extra, workdir / "app.log")
    try:
        yield Server(f"http://127.0.0.1:{port}/", proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an app already running (default: start `python app.py` on a free port)")
    p.add_argument("--pid", type=int, help="the server's process id, for its memory (with --url)")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--api-users", type=int, default=10, help="of the users, those on the OpenAI API (default 10)")
    p.add_argument("--tokenizer", type=Path, help="the served model's tokenizer folder (default: SmolLM2's)")
    p.add_argument("--seconds", type=float, default=120.0, help="the measured window (default 120)")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of load before it (default 30)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="per answer (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-growth", type=float, default=10.0, help="memory growth allowed, percent (default 10)")
    p.add_argument("--json", type=Path, help="also write the report, every request included, here")
    p.add_argument("app_args", nargs="*", help="passed to app.py (after --), e.g. -- --queue-size 8")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "openai"):  # a line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="load-") as tmp, served(args, Path(tmp)) as server:
        log.info(
            "Load: %d users (%d on the OpenAI API) for %.0f s against %s",
            args.users,
            args.api_users,
            args.seconds,
            server.url,
        )
        report = run_load(
            server.url,
            users=args.users,
            seconds=args.seconds,
            warmup=args.warmup,
            pid=server.pid,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            api_users=args.api_users,
            tokenizer=args.tokenizer,
        )
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=1))
    too_much = report.growth is not None and report.growth > args.max_growth
    return 1 if report.failed or too_much else 0


if __name__ == "__main__":
    sys.exit(main())
