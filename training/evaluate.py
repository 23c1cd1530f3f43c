"""Behaviour evaluation: greedy answers of the base model and of an adapter, side by side.

Two generation backends with one interface (``generate(prompts, model) -> answers``):

* :class:`LocalGenerator` loads the base model in-process and serves the base and the
  adapter through stanceserve's own engine (batched, the same code as the server);
* :class:`HttpGenerator` asks a running server (OpenAI-compatible chat API).

:func:`evaluate_stance` scores both sides on held-out probes and writes a Markdown
report; :func:`evaluate_scheduling` measures the meeting-room task accuracy.
Scoring itself lives in :mod:`training.scoring`, the report in :mod:`training.report`.

Precision: :class:`LocalGenerator` loads the model with the server's own ``auto`` dtype rule
(:func:`app.model_loader.resolve_dtype`: bfloat16 on CUDA and on CPUs with native bf16,
else float32), so a local evaluation runs what ``stanceserve serve`` runs. Every generator says
where it ran (:meth:`LocalGenerator.runtime`, :meth:`HttpGenerator.runtime`: device and dtype,
``"unknown"`` where a server does not say), and every report states it (:func:`runtime_of`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from app.config import EMBEDDED_MODEL, Settings
from app.engine import Engine, SamplingParams, StanceResolver, without_zero_weights
from app.model_loader import load_base_model
from app.registry.validation import linear_shapes, load_adapter_weights
from training.adapter_lookup import resolve_adapter
from training.report import fraction_different, write_eval_report
from training.scoring import LikelihoodScorer, marker_hits, marker_score, summarize
from training.tasks import scheduling

logger = logging.getLogger(__name__)

BASE = "__base__"


#: One row to answer: ``(prompt, blend)`` where ``blend`` is ``{adapter name: weight}`` (empty: the base model).
Row = tuple[str, dict[str, float]]


class Generator(Protocol):
    """Greedy chat answers for prompts, from the base model (``model=BASE``), an adapter or a live blend."""

    base_name: str

    def generate(self, prompts: list[str], model: str, max_tokens: int,
                 on_answer: Callable[[], None] | None = None) -> list[str]: ...

    def generate_rows(self, rows: list[Row], max_tokens: int, on_answer: Callable[[], None] | None = None) -> list[str]:
        """Answers to ``rows`` (each its own prompt and blend, served live, never merged), in order;
        ``on_answer`` is called once per finished answer (progress bars)."""
        ...


class LocalGenerator:
    """The base model in this process, with adapters from folders, the adapter store or the shipped adapters.

    Args:
        base: HF id or path (``None``: the embedded SmolLM2).
        adapters_dir: store searched when an adapter is given by name (default: the server's configured store,
            ``Settings.adapters_dir``); names not in it are then looked up among the shipped adapters
            (see :func:`training.adapter_lookup.resolve_adapter`).
        loaded: an already loaded ``LoadedModel`` to serve instead of loading ``base`` (tests: a tiny model).
        max_batch_size: sequences the engine decodes per step.
        max_in_flight: requests submitted at once by :meth:`generate_rows` (the engine queues the rest
            of them; the default, twice the batch, keeps the batch full without filling the queue).
    """

    def __init__(self, base: str | None = None, *, device: str = "cpu", dtype: str = "auto",
                 adapters_dir: Path | None = None, cache_dir: Path | None = None, loaded: Any = None,
                 max_batch_size: int = 16, max_in_flight: int | None = None) -> None:

        kw: dict[str, Any] = {"model": base or EMBEDDED_MODEL, "device": device, "dtype": dtype}
        if cache_dir is not None:
            kw["cache_dir"] = cache_dir
        self.settings = Settings(**kw)
        self.loaded = loaded if loaded is not None else load_base_model(self.settings)
        self.base_name = self.loaded.name
        self.adapters_dir = Path(adapters_dir) if adapters_dir else self.settings.adapters_dir
        self.shapes = linear_shapes(self.loaded.model)
        self.max_in_flight = max_in_flight or 2 * max_batch_size
        # callers still run ``self.loaded.model`` (likelihood scoring, peft references)
        self.engine = Engine(self.loaded.model, self.loaded.tokenizer, self.base_name, self.loaded.eos_token_ids,
                             keep_model_callable=True, max_loras=8, max_batch_size=max_batch_size, max_model_len=4096)
        self.engine.start()
        self._adapters: dict[str, Any] = {}
        #: the server's stance rules over this generator's adapters (names or folders)
        self.resolver = StanceResolver({BASE}, self.weights, max_weight=self.settings.max_blend_weight)

    def close(self) -> None:
        self.engine.stop()

    def runtime(self) -> dict[str, str]:
        """Where the answers are generated: ``{"where": "local", "device", "dtype"}``."""
        return {"where": "local", **model_runtime(self.loaded)}

    def resolve(self, adapter: str) -> Path:
        """The folder of ``adapter``: a path to a peft folder, else a name in ``adapters_dir``, else a shipped adapter.

        Raises:
            app.errors.AdapterLookupError: none of them holds ``adapter_config.json`` (the message names
                every folder looked at).
        """
        return resolve_adapter(adapter, self.adapters_dir)

    def weights(self, adapter: str):
        """The :class:`~app.registry.adapter.AdapterWeights` of ``adapter`` (a name or a folder), read once."""
        if adapter not in self._adapters:
            folder = self.resolve(adapter)
            w, _ = load_adapter_weights(folder, folder.resolve().name or "adapter", self.shapes, max_rank=4096)
            self._adapters[adapter] = w
        return self._adapters[adapter]

    def blend_stance(self, blend: dict[str, float]):
        """The engine :class:`~app.engine.request.Stance` of ``{adapter: weight}``: the live weighted blend the
        server runs for a request's ``stances``, by the server's rules (:mod:`app.engine.stances`); a sweep's
        zero weights mean "absent" (:func:`~app.engine.stances.without_zero_weights`; nothing left: the base model).

        Raises:
            app.errors.InvalidBlendError: more than 8 non-zero terms, or a weight past ``max_blend_weight``.
            app.errors.AdapterLookupError: an adapter that no folder holds.
        """
        return self.resolver.resolve(BASE, without_zero_weights(blend))

    def _stance(self, model: str):
        return self.resolver.resolve(model)

    def generate(self, prompts: list[str], model: str, max_tokens: int,
                 on_answer: Callable[[], None] | None = None) -> list[str]:
        stance = self._stance(model)
        return self._run([(p, stance) for p in prompts], max_tokens, on_answer)

    def generate_rows(self, rows: list[Row], max_tokens: int, on_answer: Callable[[], None] | None = None) -> list[str]:
        """Greedy answers to ``(prompt, blend)`` rows, all through the one engine (rows of different blends
        share its batches, as requests do on the server); ``max_in_flight`` at a time."""
        return self._run([(p, self.blend_stance(b)) for p, b in rows], max_tokens, on_answer)

    def _run(self, rows: list[tuple[str, Any]], max_tokens: int, on_answer: Callable[[], None] | None) -> list[str]:
        ids = [self.engine.chat_prompt_ids([{"role": "user", "content": p}]) for p, _ in rows]
        done = self.engine.generate_batch(
            ids, [st for _, st in rows], SamplingParams(max_tokens=max_tokens, temperature=0.0),
            max_in_flight=self.max_in_flight, on_completion=(lambda i, c: on_answer()) if on_answer else None,
        )
        return [c.text.strip() for c in done]


class HttpGenerator:
    """A running stanceserve (or any OpenAI-compatible server) over HTTP, greedy, 8 requests at a time."""

    def __init__(self, url: str, *, api_key: str | None = None, concurrency: int = 8, timeout_s: float = 600) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        r = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=30)
        r.raise_for_status()
        self.base_name = r.json()["data"][0]["id"]
        self._models = r.json()["data"][0]

    def close(self) -> None:
        pass

    def runtime(self) -> dict[str, str]:
        """Where the answers are generated: ``{"where": URL, "device", "dtype"}``, read from the server's
        ``/ready``, ``/health`` or ``/v1/models`` (the first that names them); ``"unknown"`` where none does."""
        found: dict[str, str] = {}
        sources: list[dict[str, Any]] = [self._models]
        for path in ("/ready", "/health"):
            try:
                r = httpx.get(f"{self.url}{path}", headers=self.headers, timeout=10)
                if r.status_code == 200 and isinstance(r.json(), dict):
                    sources.insert(0, r.json())
            except (httpx.HTTPError, ValueError):
                pass
        for key in ("device", "dtype"):
            found[key] = next((str(src[key]) for src in sources if src.get(key)), "unknown")
        return {"where": self.url, **found}

    def generate(self, prompts: list[str], model: str, max_tokens: int,
                 on_answer: Callable[[], None] | None = None) -> list[str]:
        name = self.base_name if model == BASE else model
        return self._run([(p, {"model": name}) for p in prompts], max_tokens, on_answer)

    def generate_rows(self, rows: list[Row], max_tokens: int, on_answer: Callable[[], None] | None = None) -> list[str]:
        """Each row as the server's live blend: ``model`` the base model, ``stances`` the blend (none: the base)."""
        bodies = [{"model": self.base_name, **({"stances": kept} if (kept := without_zero_weights(b)) else {})}
                  for _, b in rows]
        return self._run([(p, body) for (p, _), body in zip(rows, bodies)], max_tokens, on_answer)

    def _run(self, rows: list[tuple[str, dict[str, Any]]], max_tokens: int,
             on_answer: Callable[[], None] | None) -> list[str]:
        async def main() -> list[str]:
            sem = asyncio.Semaphore(self.concurrency)
            async with httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers) as client:

                async def one(p: str, extra: dict[str, Any]) -> str:
                    async with sem:
                        r = await client.post(f"{self.url}/v1/chat/completions", json={
                            **extra, "messages": [{"role": "user", "content": p}],
                            "max_tokens": max_tokens, "temperature": 0})
                        if r.status_code != 200:
                            raise RuntimeError(f"server error for {extra}: HTTP {r.status_code} {r.text[:300]}")
                        if on_answer is not None:
                            on_answer()
                        return r.json()["choices"][0]["message"]["content"].strip()

                return list(await asyncio.gather(*(one(p, extra) for p, extra in rows)))

        return asyncio.run(main())


def model_runtime(loaded: Any) -> dict[str, str]:
    """``{"device", "dtype"}`` of a loaded model (``LoadedModel``), as text (``cpu``, ``bfloat16``)."""
    return {"device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", "")}


def runtime_of(gen: Any, scoring: Any = None) -> dict[str, Any]:
    """Both sides of an evaluation, for its report: ``{"generation": {...}, "scoring": {...} | None}``.

    ``generation``: the generator's :meth:`runtime` (``"unknown"`` fields for a generator that cannot say);
    ``scoring``: :func:`model_runtime` of the likelihood scorer's model, or None when it did not run.
    """
    gen_side = gen.runtime() if hasattr(gen, "runtime") else {"where": "unknown", "device": "unknown",
                                                               "dtype": "unknown"}
    return {"generation": gen_side, "scoring": model_runtime_of_model(scoring) if scoring is not None else None}


def model_runtime_of_model(model: Any) -> dict[str, str]:
    """``{"device", "dtype"}`` of a torch module (its first parameter's), or of a ``LoadedModel``."""
    if hasattr(model, "device") and hasattr(model, "dtype") and not hasattr(model, "parameters"):
        return model_runtime(model)
    p = next(model.parameters())
    return {"device": str(p.device), "dtype": str(p.dtype).replace("torch.", "")}


def evaluate_stance(
    gen: Generator, adapter: str, probes: list[str], stance: str, *, report_path: Path, max_tokens: int = 96,
    likelihood_model: Any = None, likelihood_tokenizer: Any = None, examples: int = 8,
    reference: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Greedy answers of base and adapter on ``probes``, stance scores, and a Markdown report.

    Args:
        stance: which stance the scorers measure (one of :data:`training.scoring.MARKERS`).
        likelihood_model: the base model for the likelihood scorer (the scorer is skipped if ``None``).
        likelihood_tokenizer: its tokenizer.
        reference: optional ``(prompt, answer)`` pairs written in the stance (the training set's
            chosen answers, :func:`training.datasets.load_reference_answers`), scored the same way
            to show what each scorer gives the target text: an adapter that imitates its data well
            scores near it, so a reference that does not clear the base p90 means that scorer cannot
            separate this stance from the base model.

    Returns:
        Summary: fraction of answers differing from base, marker and likelihood summaries, ``runtime``
        (:func:`runtime_of`: device and dtype of the generation and the scoring side); with a
        reference, each summary also has ``"reference": {"n", "mean", "above_base_p90", "separated"}``.
    """
    base_answers = gen.generate(probes, BASE, max_tokens)
    ad_answers = gen.generate(probes, adapter, max_tokens)
    m_base = [marker_score(a, stance) for a in base_answers]
    m_ad = [marker_score(a, stance) for a in ad_answers]
    marker = summarize(m_base, m_ad)
    if reference:
        marker["reference"] = _reference_summary(m_base, [marker_score(a, stance) for _, a in reference])
    likelihood = None
    l_base = l_ad = [None] * len(probes)
    if likelihood_model is not None:
        scorer = LikelihoodScorer(likelihood_model, likelihood_tokenizer)
        l_base = scorer.score(probes, base_answers, stance)
        l_ad = scorer.score(probes, ad_answers, stance)
        try:
            likelihood = summarize(l_base, l_ad)
            if reference:
                l_ref = scorer.score([p for p, _ in reference], [a for _, a in reference], stance)
                likelihood["reference"] = _reference_summary(l_base, l_ref)
        except ValueError as e:  # e.g. every answer on one side is empty: nothing to score
            logger.warning("likelihood scores not summarised: %s", e)
    per_answer = [
        {"prompt": p, "base_marker": mb, "adapter_marker": ma, "base_likelihood": lb, "adapter_likelihood": la,
         "base_hits": marker_hits(b, stance), "adapter_hits": marker_hits(a, stance)}
        for p, b, a, mb, ma, lb, la in zip(probes, base_answers, ad_answers, m_base, m_ad, l_base, l_ad)
    ]
    runtime = runtime_of(gen, likelihood_model)
    write_eval_report(report_path, adapter=adapter, base_model=gen.base_name, probes=probes,
                      base_answers=base_answers, adapter_answers=ad_answers, stance=stance, marker=marker,
                      likelihood=likelihood, per_answer=per_answer, examples=examples, runtime=runtime)
    return {"adapter": adapter, "stance": stance, "probes": len(probes),
            "fraction_different": fraction_different(base_answers, ad_answers),
            "marker": marker, "likelihood": likelihood, "runtime": runtime, "report": str(report_path)}


def _reference_summary(base_scores: list[float], reference_scores: list[float]) -> dict[str, Any]:
    """How the reference answers score against the base answers' distribution (see :func:`evaluate_stance`)."""
    s = summarize(base_scores, reference_scores)
    return {"n": s["n_adapter"], "mean": s["adapter_mean"], "above_base_p90": s["adapter_above_base_p90"],
            "separated": s["separated"]}


def evaluate_scheduling(gen: Generator, adapter: str | None, *, n: int, seed: int, max_tokens: int = 160) -> dict[str, Any]:
    """Accuracy on ``n`` generated meeting-room problems (seed ``seed``), overall and by difficulty.

    Evaluates the base model, and the adapter when given.
    """
    problems = scheduling.generate(n, seed)
    questions = [p.question() for p in problems]
    out: dict[str, Any] = {"n": n, "seed": seed}
    out["base"] = scheduling.evaluate(gen.generate(questions, BASE, max_tokens), problems)
    if adapter:
        out["adapter"] = scheduling.evaluate(gen.generate(questions, adapter, max_tokens), problems)
        out["adapter_name"] = adapter
    return out
