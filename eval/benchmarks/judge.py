"""A small OpenAI-compatible chat-completions client for LLM-as-judge metrics (MM-Vet, LLaVA-Bench).

Plain ``urllib.request``: one JSON POST to ``<base_url>/chat/completions`` per prompt, with temperature 0, a
timeout, and retries with exponential backoff on HTTP 429 / 5xx and on connection errors. Every answer is
appended to a JSONL cache keyed by a hash of ``(model, messages, max_tokens)``, so a resumed or repeated run
pays for each judgement once.

Configuration:

- base URL: the ``base_url`` argument, else the environment variable ``OPENAI_BASE_URL``, else
  ``https://api.openai.com/v1`` (any OpenAI-compatible server works: vLLM, Azure-style proxies, ...).
- API key: read from the environment variable named by ``api_key_env`` (default ``OPENAI_API_KEY``) when the
  client is used, never stored in a config file, and redacted (``eval.redaction``) from every server text the
  client puts in an error, a log line or its cache (a server may echo the key it was sent). Without a key,
  :meth:`JudgeClient.complete` returns None and logs one warning: the benchmark then reports its metric as
  pending (None), never as zero.
- model: default ``gpt-4-0613``, the judge MM-Vet's evaluator used (Yu et al., 2023, "MM-Vet: Evaluating
  Large Multimodal Models for Integrated Capabilities", and its released evaluator); LLaVA's own
  LLaVA-Bench reviews used ``gpt-4-0314`` (Liu et al., 2023), no longer served, and lmms-eval uses
  ``gpt-4-0613`` for both. Scores from different judge models are not comparable: report the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from eval.benchmarks.base import Benchmark, Sample, check_limit, load_local_or_hub
from eval.redaction import redact

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_MODEL", "JudgeClient", "JudgeError", "JudgedBenchmark", "make_judge"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4-0613"
_RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx


class JudgeError(RuntimeError):
    """The judge could not answer: a non-retryable HTTP error, retries exhausted, or a malformed reply."""


Messages = list[dict[str, str]]


class JudgeClient:
    """Ask an OpenAI-compatible chat model for a completion, with a persistent answer cache.

    Args:
        model: the judge model name sent in the request.
        api_key_env: name of the environment variable holding the API key (read at call time).
        base_url: API root (``.../v1``); None: ``$OPENAI_BASE_URL`` or :data:`DEFAULT_BASE_URL`.
        cache_path: JSONL file of earlier answers (created on first answer); None: no cache.
        timeout_s: per-request timeout.
        max_retries: retries after the first attempt on 429 / 5xx / connection errors.
        backoff_s: first retry delay; doubles per retry (a ``Retry-After`` header, if larger, wins; capped
            at 60 s).
        max_tokens: default completion length limit (None: the server's default).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        api_key_env: str = "OPENAI_API_KEY",
        base_url: str | None = None,
        cache_path: str | os.PathLike | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 2.0,
        max_tokens: int | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.api_key_env = api_key_env
        self._base_url = base_url
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self._cache: dict[str, str] | None = None
        self._warned_no_key = False
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """The API root in use (argument, else ``$OPENAI_BASE_URL``, else the OpenAI API)."""
        return (self._base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")

    @property
    def api_key(self) -> str | None:
        """The key from ``$<api_key_env>``, or None when unset or empty."""
        return os.environ.get(self.api_key_env) or None

    @property
    def available(self) -> bool:
        """Whether a key is set (without it every uncached :meth:`complete` returns None)."""
        return self.api_key is not None

    def complete(self, prompt: str | Sequence[Mapping[str, str]], max_tokens: int | None = None) -> str | None:
        """The judge's reply to ``prompt`` (a user message, or a full list of chat messages).

        Returns:
            The reply text (from the cache when this model already answered this prompt), or None when it
            is not cached and no API key is set (one warning per client).

        Raises:
            JudgeError: a non-retryable HTTP error (e.g. 401), retries exhausted, or a reply without
                ``choices[0].message.content``.
        """
        messages: Messages = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        )
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        key = self.cache_key(messages, max_tokens)
        cached = self._load_cache().get(key)
        if cached is not None:
            return cached
        api_key = self.api_key
        if api_key is None:
            if not self._warned_no_key:
                logger.warning(
                    "no judge API key: set $%s (and $OPENAI_BASE_URL for a non-OpenAI server) to score with %s; "
                    "judge metrics are reported as pending",
                    self.api_key_env,
                    self.model,
                )
                self._warned_no_key = True
            return None
        body: dict = {"model": self.model, "messages": messages, "temperature": 0}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        reply = self._post(body, api_key)
        self._store(key, reply)
        return reply

    def cache_key(self, messages: Messages, max_tokens: int | None = None) -> str:
        """SHA-256 of the model name, the messages and the length limit (canonical JSON)."""
        payload = json.dumps([self.model, messages, max_tokens], sort_keys=True, ensure_ascii=False, allow_nan=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _post(self, body: dict, api_key: str) -> str:
        url = f"{self.base_url}/chat/completions"
        data = json.dumps(body, allow_nan=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            delay = self.backoff_s * 2**attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
                return redact(_reply_text(payload, url, api_key), api_key)
            except urllib.error.HTTPError as err:
                detail = redact(err.read()[:500].decode("utf-8", "replace"), api_key)  # servers may echo the key
                if err.code not in _RETRY_STATUS and err.code < 500:
                    raise JudgeError(f"judge request to {url} failed with HTTP {err.code}: {detail}") from None
                retry_after = _retry_after(err.headers.get("Retry-After") if err.headers else None)
                delay = max(delay, retry_after or 0.0)
                problem = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                problem = redact(f"{type(err).__name__}: {err}", api_key)
            if attempt == self.max_retries:
                raise JudgeError(
                    f"judge request to {url} failed after {self.max_retries + 1} attempts ({problem}); "
                    "check the server / network and run again (answers so far are cached)"
                )
            delay = min(delay, 60.0)
            logger.warning("judge request failed (%s); retry %d/%d in %.1f s", problem, attempt + 1,
                           self.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _load_cache(self) -> dict[str, str]:
        if self._cache is not None:
            return self._cache
        self._cache = {}
        if self.cache_path is not None and self.cache_path.is_file():
            for number, line in enumerate(self.cache_path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self._cache[row["key"]] = row["response"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s:%d is not a judge cache entry; ignored", self.cache_path, number)
        return self._cache

    def _store(self, key: str, reply: str) -> None:
        self._load_cache()[key] = reply
        if self.cache_path is None:
            return
        line = json.dumps({"key": key, "model": self.model, "response": reply}, ensure_ascii=False, allow_nan=False) + "\n"
        with self._lock:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as handle:  # one write per line: appends interleave
                handle.write(line)


def _reply_text(payload: bytes, url: str, api_key: str | None = None) -> str:
    """``choices[0].message.content`` of a chat-completions response body (secrets redacted from errors)."""
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise JudgeError(f"{url} returned no choices[0].message.content: "
                         f"{redact(repr(payload[:300]), api_key)}") from None
    if not isinstance(content, str):
        raise JudgeError(f"{url} returned non-text content: {redact(repr(content), api_key)}")
    return content


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (HTTP-dates are ignored)."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def make_judge(judge: JudgeClient | Mapping | None) -> JudgeClient:
    """A :class:`JudgeClient` from a client, a mapping of its arguments (e.g. a Hydra node), or None (defaults)."""
    if isinstance(judge, JudgeClient):
        return judge
    if judge is None:
        return JudgeClient()
    if isinstance(judge, Mapping) or hasattr(judge, "items"):
        return JudgeClient(**{str(k): v for k, v in judge.items() if k != "_target_"})
    raise TypeError(f"judge must be a JudgeClient, a mapping of its arguments or None, got {type(judge).__name__}")


class JudgedBenchmark(Benchmark):
    """Shared shape of the open-answer tasks scored by an LLM judge (MM-Vet, LLaVA-Bench-in-the-Wild).

    Questions come from a local folder (``_read_local(path)``, set by the subclass) or, when ``data_dir`` is
    None, from the Hugging Face dataset ``hub_id`` (``_load_hub``, which keeps the rows in ``self._hub``, their
    images decoded in memory). The prompt is the question as is. Subclasses set ``name``, ``title``,
    ``data_hint`` (what ``data_dir`` must hold) and ``max_new_tokens``, and implement ``score``.

    Args:
        data_dir: the benchmark folder; None: load ``hub_id``.
        limit: keep only the first ``limit`` questions (file order).
        judge: a :class:`JudgeClient`, or a mapping of its arguments (the Hydra ``judge`` node); None: defaults.
        hub_id: Hugging Face dataset id used when ``data_dir`` is None.
        allow_external_images: accept image paths in the local files that lead outside ``data_dir``
            (absolute, or with ``..``); refused by default (see :func:`eval.benchmarks.base.data_path`).
    """

    title: str
    data_hint: str
    _read_local: Callable[[Path, bool], list[Sample]]  # (data_dir, allow_external_images) -> samples

    def __init__(self, data_dir: str | None = None, limit: int | None = None,
                 judge: JudgeClient | Mapping | None = None, hub_id: str | None = None,
                 allow_external_images: bool = False) -> None:
        check_limit(limit)
        self.judge = make_judge(judge)
        self._hub = None
        self.allow_external_images = bool(allow_external_images)
        self._samples, _ = load_local_or_hub(
            data_dir, hub_id, lambda local: self._read_local(local, self.allow_external_images), self._load_hub,
            f"{type(self).__name__} needs data_dir ({self.data_hint}) or hub_id",
        )
        self._by_id = {s.id: s for s in self._samples}
        if limit is not None:
            self._samples = self._samples[:limit]
        logger.info("%s: %d questions", self.title, len(self._samples))

    def _load_hub(self, hub_id: str) -> list[Sample]:
        raise NotImplementedError

    def prompt(self, sample: Sample) -> str:
        """The question as is."""
        return sample.question

    def visual_inputs(self, sample: Sample) -> list:
        """The image path (local data) or the decoded PIL image (Hugging Face data)."""
        if sample.image_paths:
            return list(sample.image_paths)
        return [self._hub[sample.meta["hub_row"]]["image"]]
